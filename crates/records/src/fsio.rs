//! The run folder's file discipline: every output goes through [`write_atomic`] (a temporary
//! file in the same folder, written, fsynced, renamed over the target, the folder fsynced), so
//! a kill, a power cut or a full disk leaves either the old file or the new one, never half of
//! one; and a run folder or a teacher-cache entry is held by one process at a time
//! ([`DirLock`], an advisory lock on `.mtkd.lock` that records the holder's pid).
//!
//! The two exceptions are logs, which are appended to: `mtkd.log` and `weights.csv` (the latter
//! is flushed and synced at every epoch's end and trimmed to the checkpoint on resume).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The temporary sibling of `path` (same folder, so the rename is atomic; same extension, for
/// writers that pick a format from it).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_owned(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    path.with_file_name(format!(".{stem}.tmp-{}{ext}", std::process::id()))
}

/// Why a write failed, in the user's words (a full disk is named as such).
fn explain(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(28) => "no space left on device".to_owned(),
        Some(27) => "file too large (the file-size limit, ulimit -f)".to_owned(),
        _ => e.to_string(),
    }
}

/// Sync a folder so that a rename inside it survives a power cut.
fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing the folder {}", d.display()))
}

/// Replace `path` with `bytes` atomically and durably. On failure the previous file (if any) is
/// untouched, the temporary file is removed, and the error names `path` and the cause.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// Like [`write_atomic`] for writers that take a path (libtorch, safetensors, image encoders):
/// `write` fills the temporary path it is given; it is then fsynced and renamed over `path`.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<()> {
    let tmp = temp_path(path);
    let fail = |what: String| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!(
            "writing {}: {what}{}",
            path.display(),
            if path.exists() {
                " (the previous file is kept unchanged)"
            } else {
                ""
            }
        )
    };
    if let Err(e) = write(&tmp) {
        let msg = match e.downcast_ref::<std::io::Error>() {
            Some(io) => explain(io),
            // Libraries that wrap the OS error in their own (safetensors, libtorch).
            None => {
                let text = e.to_string();
                let os = [28, 27]
                    .into_iter()
                    .find(|c| text.contains(&format!("code: {c},")));
                match os {
                    Some(c) => format!(
                        "{} ({text})",
                        explain(&std::io::Error::from_raw_os_error(c))
                    ),
                    None => text,
                }
            }
        };
        return Err(fail(msg));
    }
    if let Err(e) = File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.sync_all())
    {
        return Err(fail(explain(&e)));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        return Err(fail(explain(&e)));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Free bytes for an unprivileged writer on the file system that holds `path` (or its folder).
pub fn free_bytes(path: &Path) -> Result<u64> {
    let probe = if path.is_dir() {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    let st = rustix::fs::statvfs(probe)
        .with_context(|| format!("reading the free space of {}", probe.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuse, naming the file, when the file system of `path` has less than `need` bytes free
/// (before a write by a library that cannot report a full disk as an error).
pub fn ensure_room(path: &Path, need: u64) -> Result<()> {
    room_check(path, need, free_bytes(path)?)
}

fn room_check(path: &Path, need: u64, free: u64) -> Result<()> {
    if free < need {
        bail!(
            "writing {}: no space left on device (about {:.1} MB needed, {:.1} MB free); free some \
             space and run the same command again (a finished run resumes to its outputs)",
            path.display(),
            need as f64 / 1e6,
            free as f64 / 1e6
        );
    }
    Ok(())
}

/// [`write_atomic`] of a value as pretty JSON.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// The name of the lock file in a held folder.
pub const LOCK_FILE: &str = ".mtkd.lock";

/// An advisory lock on a folder, held until dropped (or the process ends, however it ends: the
/// kernel releases it). The lock file records the holder's pid and command for the message a
/// second process gets.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    fn open(dir: &Path) -> Result<(File, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        Ok((file, path))
    }

    fn stamp(file: File, path: PathBuf) -> Result<DirLock> {
        let holder = format!(
            "pid {} ({})\n",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        file.set_len(0)
            .and_then(|()| (&file).write_all(holder.as_bytes()))
            .with_context(|| format!("writing the lock file {}", path.display()))?;
        Ok(DirLock { _file: file, path })
    }

    /// Who holds the lock of `path`, as recorded in it.
    fn holder(path: &Path) -> String {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "another process".to_owned())
    }

    /// Take the lock of `dir` or fail at once, naming the holder; `what` names the folder for the
    /// message ("run folder", "comparison folder").
    pub fn try_acquire(dir: &Path, what: &str) -> Result<DirLock> {
        let (file, path) = Self::open(dir)?;
        match file.try_lock() {
            Ok(()) => Self::stamp(file, path),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "the {what} {} is in use by {}; wait for it to end or stop it (a stopped run \
                 resumes with mtkd train --resume {})",
                dir.display(),
                Self::holder(&path),
                dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
            }
        }
    }

    /// Take the lock of `dir`, waiting while another process holds it; `waiting` is called once,
    /// with the holder, before the wait.
    pub fn acquire_waiting(dir: &Path, waiting: impl FnOnce(&str)) -> Result<DirLock> {
        let (file, path) = Self::open(dir)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                waiting(&Self::holder(&path));
                file.lock()
                    .with_context(|| format!("locking {}", path.display()))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
            }
        }
        Self::stamp(file, path)
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A stable 16-hex-digit hash of `bytes` (64-bit FNV-1a): names of cached files and folders
/// (teachers, shared outputs, generated data) and the identity of a run's configuration. The
/// same on every machine and in every version, unlike `std`'s hasher.
pub fn stable_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mtkd-fsio-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let d = scratch("fail");
        let p = d.join("summary.json");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(Box::new(std::io::Error::from_raw_os_error(28)))
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("summary.json"), "{msg}");
        assert!(msg.contains("no space left on device"), "{msg}");
        assert!(msg.contains("previous file is kept"), "{msg}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn too_little_room_is_refused_with_the_file_named() {
        let p = Path::new("/runs/a/student.pt");
        let msg = format!("{:#}", room_check(p, 10_000_000, 1_000_000).unwrap_err());
        assert!(
            msg.contains("student.pt") && msg.contains("no space left"),
            "{msg}"
        );
        room_check(p, 10, 11).unwrap();
        assert!(free_bytes(&std::env::temp_dir()).unwrap() > 0);
    }

    #[test]
    fn a_waiting_lock_waits_for_the_holder() {
        let d = scratch("wait");
        let held = DirLock::try_acquire(&d, "teacher cache entry").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = d.clone();
        let waiter = std::thread::spawn(move || {
            let mut waited = None;
            let lock = DirLock::acquire_waiting(&d2, |holder| waited = Some(holder.to_owned()));
            tx.send(()).unwrap();
            (lock.is_ok(), waited)
        });
        // Still waiting while the lock is held.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err());
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        let (ok, waited) = waiter.join().unwrap();
        assert!(ok);
        assert!(waited
            .unwrap()
            .contains(&format!("pid {}", std::process::id())));
    }

    #[test]
    fn the_temporary_keeps_the_extension() {
        let t = temp_path(Path::new("/r/student.safetensors"));
        assert!(t.to_string_lossy().ends_with(".safetensors"), "{t:?}");
        assert!(t
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".student.tmp-"));
    }

    #[test]
    fn a_held_folder_is_refused_with_its_holder_and_free_again_after_drop() {
        let d = scratch("lock");
        let held = DirLock::try_acquire(&d, "run folder").unwrap();
        let err = DirLock::try_acquire(&d, "run folder").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("in use"), "{msg}");
        drop(held);
        DirLock::try_acquire(&d, "run folder").unwrap();
    }
}
