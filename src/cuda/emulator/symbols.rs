//! Naming what a fault hit: the source line of an instruction in a compiled
//! kernel module (addr2line) and the `__shared__` variable at an address
//! (nm). Both tools come with the C++ compiler's binutils; without them a
//! message gives the raw offset instead.

use super::host_compile::HostModule;

/// A message from the prelude with its `@pc:0x…@` tokens (a return address
/// in kernel code) replaced by the source line of the call, and its
/// `@shared:0x…@` tokens (an offset into the module's shared memory) by the
/// `__shared__` variable there.
pub(crate) fn with_source_lines(message: &str, module: &HostModule) -> String {
    let mut out = String::new();
    let mut rest = message;
    while let Some(start) = rest.find('@') {
        let Some(len) = rest[start + 1..].find('@') else {
            break;
        };
        let token = &rest[start + 1..start + 1 + len];
        out.push_str(&rest[..start]);
        let value = |prefix: &str| {
            token
                .strip_prefix(prefix)
                .and_then(|hex| usize::from_str_radix(hex, 16).ok())
        };
        match (value("pc:0x"), value("shared:0x")) {
            // A return address points after the call; the call is one byte before.
            (Some(pc), _) => out.push_str(&source_line(module, pc.saturating_sub(1))),
            (_, Some(offset)) => out.push_str(&shared_variable(module, offset)),
            _ => out.push_str(&rest[start..start + len + 2]),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// "byte 512 of `partial` (in tree_sum(...))": the `__shared__` variable at
/// `offset` in the module's shared memory, read from its symbol table with
/// `nm`; the bare offset where that tool is missing.
fn shared_variable(module: &HostModule, offset: usize) -> String {
    let fallback = format!("byte {offset} of the module's shared memory");
    let address = module.shared.0 as usize + offset;
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables.
    if unsafe { libc::dladdr(module.shared.0 as *const libc::c_void, &mut info) } == 0 {
        return fallback;
    }
    let relative = address - info.dli_fbase as usize;
    let Ok(output) = std::process::Command::new("nm")
        .args(["-C", "-S", "--defined-only"])
        .arg(&module.library_path)
        .output()
    else {
        return fallback;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(start), Some(size), Some(_kind), Some(name)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(start), Ok(size)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(size, 16),
        ) else {
            continue;
        };
        if (start..start + size).contains(&relative) {
            let (function, variable) = name.rsplit_once("::").unwrap_or(("", name));
            let within = if function.is_empty() {
                String::new()
            } else {
                format!(" (in {function})")
            };
            return format!("byte {} of `{variable}`{within}", relative - start);
        }
    }
    fallback
}

/// `file:line (function)` of an instruction in a module, via addr2line;
/// the library offset where that tool is missing.
pub(crate) fn source_line(module: &HostModule, instruction: usize) -> String {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables.
    let found = unsafe { libc::dladdr(instruction as *const libc::c_void, &mut info) } != 0;
    if !found || info.dli_fbase.is_null() {
        return format!("instruction 0x{instruction:x} (outside the kernel module)");
    }
    let offset = instruction - info.dli_fbase as usize;
    let lookup = std::process::Command::new("addr2line")
        .arg("-e")
        .arg(&module.library_path)
        .args(["-f", "-C", "-i"])
        .arg(format!("0x{offset:x}"))
        .output();
    if let Ok(output) = lookup
        && output.status.success()
    {
        let text = String::from_utf8_lossy(&output.stdout);
        // Pairs of lines (function, path:line), innermost inlined frame
        // first; keep the frames in kernel sources, as kernels/<file>:<line>.
        let frames: Vec<&str> = text
            .lines()
            .skip(1)
            .step_by(2)
            .filter_map(|location| location.find("kernels/").map(|at| &location[at..]))
            .map(|location| location.split(' ').next().unwrap_or(location))
            .collect();
        if !frames.is_empty() {
            return frames.join(", inlined from ");
        }
    }
    format!("{}+0x{offset:x}", module.library_path.display())
}
