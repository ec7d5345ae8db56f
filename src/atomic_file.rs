//! Files written so that a reader, or a crash, never sees half of one: the
//! bytes go to a uniquely named temporary file beside the target, which is
//! synced and renamed over the target only once complete. [`AtomicFile`]
//! streams (a picture or a tensor far larger than memory, written band by
//! band); dropping it uncommitted removes the temporary file and leaves the
//! target as it was. And files read only when they are regular files
//! ([`read_regular_file`]): a device never ends, and a pipe may block.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file being written under a temporary name; [`AtomicFile::commit`]
/// puts it in place.
pub struct AtomicFile {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<BufWriter<fs::File>>,
}

impl AtomicFile {
    /// Starts writing what will become `path`.
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        let temporary = temporary_path(path);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            temporary,
            file: Some(BufWriter::new(file)),
        })
    }

    /// Flushes, syncs and renames the file over its target, then syncs the
    /// directory where the platform allows.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("an uncommitted file is open");
        let placed = file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .and_then(|()| fs::rename(&self.temporary, &self.path));
        if let Err(e) = placed {
            let _ = fs::remove_file(&self.temporary);
            return Err(e);
        }
        if let Some(directory) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(dir) = fs::File::open(directory)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn writer(&mut self) -> &mut BufWriter<fs::File> {
        self.file.as_mut().expect("an uncommitted file is open")
    }
}

impl Write for AtomicFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.writer().write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    /// An uncommitted file (an error, a panic, an early return) leaves no trace.
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temporary);
        }
    }
}

/// Replaces `path` with `bytes` atomically (see [`AtomicFile`]): on failure
/// `path` is unchanged and no temporary file is left. Every file kiln
/// writes for a user (checkpoints, run state, pictures, the PTX cache) goes
/// through here or through an [`AtomicFile`].
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// The bytes of the regular file at `path`. Anything else (a directory, a
/// device such as /dev/zero, which never ends, a pipe, whose opening can
/// block forever) is refused before it is opened, with `InvalidInput`.
pub fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    if !fs::metadata(path)?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a directory, device or pipe)",
        ));
    }
    fs::read(path)
}

/// A temporary name beside `path`, unique within this process and across
/// processes, hidden (a leading dot) so that listings and globs skip it.
pub fn temporary_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    path.with_file_name(unique)
}

/// Bytes free for an unprivileged user on the file system holding `path`
/// (the nearest existing ancestor of it), or None where it cannot be asked.
pub fn available_bytes(path: &Path) -> Option<u64> {
    let mut probe = path;
    while !probe.exists() {
        probe = probe.parent()?;
        if probe.as_os_str().is_empty() {
            probe = Path::new(".");
        }
    }
    available_on(probe)
}

#[cfg(unix)]
fn available_on(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `name` is a NUL-terminated path and `stats` a buffer of the
    // type statvfs fills; it is read only when the call succeeds.
    let stats = unsafe {
        if libc::statvfs(name.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    Some(stats.f_bavail as u64 * stats.f_frsize as u64)
}

#[cfg(not(unix))]
fn available_on(_path: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-atomic-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_dropped_file_leaves_the_target_untouched_and_no_temporary() {
        let dir = scratch("drop");
        let target = dir.join("picture.png");
        fs::write(&target, b"old").unwrap();
        {
            let mut file = AtomicFile::create(&target).unwrap();
            file.write_all(b"half a new pict").unwrap();
        }
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

        let mut file = AtomicFile::create(&target).unwrap();
        file.write_all(b"new").unwrap();
        file.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn free_space_is_found_from_the_nearest_existing_folder() {
        let dir = scratch("space");
        let free = available_bytes(&dir.join("not/yet/made.png"));
        if cfg!(unix) {
            assert!(free.is_some_and(|b| b > 0), "{free:?}");
        }
        fs::remove_dir_all(dir).unwrap();
    }
}
