//! Reading kernel sources as text: which `__global__` functions a file
//! defines, their `__launch_bounds__`, and the static `__shared__` arrays
//! each declares. The emulator generates its per-kernel entry points from
//! this, and the tests use it to know every kernel that must have run, so a
//! kernel added to kernels/ needs no hand-written table anywhere.

/// One `extern "C" __global__` function found in a source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelDecl {
    pub name: String,
    /// The first argument of `__launch_bounds__(...)`, as C++ text (it may
    /// use the file's macros), if the kernel declares one.
    pub launch_bounds: Option<String>,
    /// The `__shared__` declarations in the kernel's body, each as a C++ type
    /// whose `sizeof` is the bytes it takes, e.g. `float[V3_BK][V3_STRIDE]`.
    pub shared_types: Vec<String>,
    /// True if the body declares `extern __shared__` (dynamic shared memory).
    pub dynamic_shared: bool,
}

/// The source with comments and string/char literal contents replaced by
/// spaces (newlines kept), so a keyword inside either is never matched and
/// byte offsets still line up with the original.
pub fn strip_comments(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = bytes.to_vec();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let start = i;
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                let end = (i + 2).min(bytes.len());
                for b in &mut out[start..end] {
                    if *b != b'\n' {
                        *b = b' ';
                    }
                }
                i = end;
            }
            quote @ (b'"' | b'\'') => {
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    if bytes[i] == b'\\' {
                        out[i] = b' ';
                        i += 1;
                    }
                    if i < bytes.len() && bytes[i] != b'\n' {
                        out[i] = b' ';
                    }
                    i += 1;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    // Only ASCII bytes were replaced by ASCII spaces, and whole multi-byte
    // characters lie inside the replaced spans or outside them.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Index just past the bracket that closes the one at `open`.
fn matching_close(text: &[u8], open: usize, (left, right): (u8, u8)) -> Option<usize> {
    let mut depth = 0usize;
    for (i, &b) in text.iter().enumerate().skip(open) {
        if b == left {
            depth += 1;
        } else if b == right {
            depth -= 1;
            if depth == 0 {
                return Some(i + 1);
            }
        }
    }
    None
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every `__global__` function defined in `source`, in order.
pub fn kernel_decls(source: &str) -> Vec<KernelDecl> {
    let text = strip_comments(source);
    let bytes = text.as_bytes();
    let mut kernels = Vec::new();
    for (at, _) in text.match_indices("__global__") {
        // The declaration runs from the previous statement's end to the body.
        let start = text[..at].rfind([';', '}']).map_or(0, |i| i + 1);
        let Some(open_paren) = text[at..].find('(').map(|i| at + i) else {
            continue;
        };
        let Some(name) = text[at + "__global__".len()..open_paren]
            .split_whitespace()
            .last()
        else {
            continue;
        };
        let Some(close_paren) = matching_close(bytes, open_paren, (b'(', b')')) else {
            continue;
        };
        let Some(open_brace) = text[close_paren..]
            .find(['{', ';'])
            .map(|i| close_paren + i)
        else {
            continue;
        };
        if bytes[open_brace] == b';' {
            continue; // a declaration without a body
        }
        let body_end = matching_close(bytes, open_brace, (b'{', b'}')).unwrap_or(bytes.len());
        let body = &text[open_brace..body_end];
        let (shared_types, dynamic_shared) = shared_declarations(body);
        kernels.push(KernelDecl {
            name: name.to_string(),
            launch_bounds: launch_bounds(&text[start..open_paren]),
            shared_types,
            dynamic_shared,
        });
    }
    kernels
}

/// Names of the `__global__` functions defined in `source`.
pub fn kernel_names(source: &str) -> Vec<String> {
    kernel_decls(source).into_iter().map(|k| k.name).collect()
}

/// The first argument of a `__launch_bounds__(...)` in a declaration.
fn launch_bounds(declaration: &str) -> Option<String> {
    let at = declaration.find("__launch_bounds__")?;
    let open = at + declaration[at..].find('(')?;
    let bytes = declaration.as_bytes();
    let close = matching_close(bytes, open, (b'(', b')'))?;
    let inner = &declaration[open + 1..close - 1];
    // Cut at the first comma outside parentheses (minBlocksPerMultiprocessor follows).
    let mut depth = 0i32;
    let mut end = inner.len();
    for (i, b) in inner.bytes().enumerate() {
        match b {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    Some(inner[..end].trim().to_string())
}

/// The `__shared__` declarations of a kernel body as sizeof-able types, and
/// whether any of them is dynamic (`extern __shared__`).
fn shared_declarations(body: &str) -> (Vec<String>, bool) {
    let mut types = Vec::new();
    let mut dynamic = false;
    for (at, _) in body.match_indices("__shared__") {
        let before = body[..at].trim_end();
        if before.ends_with("extern") {
            dynamic = true;
            continue;
        }
        let rest = &body[at + "__shared__".len()..];
        let Some(end) = rest.find(';') else { continue };
        let mut declaration = rest[..end].to_string();
        // Drop attributes: they change alignment, not size.
        while let Some(a) = declaration.find("__align__") {
            let open = a + declaration[a..].find('(').unwrap_or(0);
            let close =
                matching_close(declaration.as_bytes(), open, (b'(', b')')).unwrap_or(open + 1);
            declaration.replace_range(a..close, " ");
        }
        let declaration = declaration.trim();
        let declaration = declaration.split('=').next().unwrap_or(declaration).trim();
        let (head, dims) = match declaration.find('[') {
            Some(i) => (&declaration[..i], &declaration[i..]),
            None => (declaration, ""),
        };
        let head = head.trim_end();
        let name_start = head
            .bytes()
            .rposition(|b| !is_ident_byte(b))
            .map_or(0, |i| i + 1);
        let element_type = head[..name_start].trim();
        if element_type.is_empty() {
            continue;
        }
        types.push(format!("{element_type}{dims}"));
    }
    (types, dynamic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kernels_bounds_and_shared_arrays_but_not_comments() {
        let source = r#"
            // __global__ void not_a_kernel(const P p) {}
            #define TILE 32
            extern "C" __launch_bounds__(TILE * TILE, 2) __global__ void tiled(const P p) {
                __shared__ __align__(16) float a[TILE][TILE + 1];
                __shared__ double total;
                if (p.n) { a[0][0] = 1; }
            }
            static_assert(sizeof(P) == 8, "__global__ in a string");
            extern "C" __global__ void plain(const Q q) { extern __shared__ float dyn[]; }
        "#;
        let kernels = kernel_decls(source);
        assert_eq!(kernels.len(), 2);
        assert_eq!(kernels[0].name, "tiled");
        assert_eq!(kernels[0].launch_bounds.as_deref(), Some("TILE * TILE"));
        assert_eq!(kernels[0].shared_types, ["float[TILE][TILE + 1]", "double"]);
        assert!(!kernels[0].dynamic_shared);
        assert_eq!(kernels[1].name, "plain");
        assert_eq!(kernels[1].launch_bounds, None);
        assert!(kernels[1].dynamic_shared);
    }

    #[test]
    fn every_embedded_kernel_file_declares_kernels() {
        let total: usize = crate::kernels::KERNEL_SOURCES
            .iter()
            .filter(|(name, _)| name.ends_with(".cu"))
            .map(|(name, source)| {
                let n = kernel_names(source).len();
                assert!(n > 0, "kernels/{name} declares no __global__ function");
                n
            })
            .sum();
        assert!(total >= 57, "found {total} kernels");
    }
}
