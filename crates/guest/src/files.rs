//! File copies for the host (`vhpc cp`): a copy-in is written to a temporary file next to
//! its target and renamed over it only when every announced byte arrived (a broken copy
//! never leaves a half-written target); a copy-out streams a regular file in chunks.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::session::{MAX_CHUNK, Response};

/// Permission bits a copy may set (no file type bits).
const MODE_MASK: u32 = 0o7777;

/// A copy-in in progress.
pub(crate) struct CopyIn {
    pub id: u32,
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    mode: u32,
    size: u64,
    written: u64,
    /// The first thing that went wrong; reported when the host ends the copy.
    error: Option<String>,
}

impl CopyIn {
    /// Starts writing `size` bytes for `target`. A failure is remembered and reported at
    /// the end (the host streams the data without waiting for an answer).
    pub(crate) fn start(id: u32, target: &str, mode: u32, size: u64) -> CopyIn {
        let target = PathBuf::from(target);
        let tmp = temporary_name(&target);
        let mut copy = CopyIn {
            id,
            target,
            tmp,
            file: None,
            mode: mode & MODE_MASK,
            size,
            written: 0,
            error: None,
        };
        match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&copy.tmp)
        {
            Ok(f) => copy.file = Some(f),
            Err(e) => {
                copy.error = Some(format!(
                    "cannot create {} in the guest: {e}",
                    copy.target.display()
                ))
            }
        }
        copy
    }

    pub(crate) fn data(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if self.written + bytes.len() as u64 > self.size {
            self.fail(format!(
                "the host sent more than the {} bytes it announced",
                self.size
            ));
            return;
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.write_all(bytes) {
            Ok(()) => self.written += bytes.len() as u64,
            Err(e) => self.fail(format!("cannot write {}: {e}", self.target.display())),
        }
    }

    /// Completes the file: size check, data synced, mode set, renamed into place.
    pub(crate) fn finish(mut self) -> Result<u64, String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.written != self.size {
            return Err(format!(
                "the copy ended after {} of {} bytes",
                self.written, self.size
            ));
        }
        let file = self.file.take().ok_or("the copy has no file")?;
        let target = self.target.display().to_string();
        file.sync_all()
            .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(self.mode)))
            .and_then(|()| std::fs::rename(&self.tmp, &self.target))
            .map_err(|e| format!("cannot complete {target}: {e}"))?;
        Ok(self.written)
    }

    fn fail(&mut self, error: String) {
        self.error = Some(error);
        self.file = None;
    }
}

impl Drop for CopyIn {
    /// An unfinished copy leaves nothing behind (a finished one was renamed away).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn temporary_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.vhpc-copy"))
}

/// Sends the regular file at `path`: FileInfo, FileData chunks, Done; or one Error.
/// `send` failing means the host is gone; that error is returned.
pub(crate) fn copy_out(
    path: &str,
    send: &mut impl FnMut(Response) -> io::Result<()>,
) -> io::Result<()> {
    let opened = File::open(path).and_then(|f| Ok((f.metadata()?, f)));
    let (meta, mut file) = match opened {
        Ok((meta, _)) if !meta.is_file() => {
            return send(Response::Error(format!(
                "{path} in the guest is not a regular file"
            )));
        }
        Ok(x) => x,
        Err(e) => {
            return send(Response::Error(format!(
                "cannot open {path} in the guest: {e}"
            )));
        }
    };
    send(Response::FileInfo {
        mode: meta.permissions().mode() & MODE_MASK,
        size: meta.len(),
    })?;
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return send(Response::Done(total)),
            Ok(n) => {
                total += n as u64;
                send(Response::FileData(buf[..n].to_vec()))?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return send(Response::Error(format!("cannot read {path}: {e}"))),
        }
    }
}

/// The file's bytes in a sequence of copy-out responses (tests of the agent's file copy).
#[cfg(test)]
pub(crate) fn file_bytes<'a>(responses: impl IntoIterator<Item = &'a Response>) -> Vec<u8> {
    responses
        .into_iter()
        .filter_map(|r| match r {
            Response::FileData(d) => Some(d.as_slice()),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn copy_in_completes_only_with_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let t = target.to_str().unwrap();
        let mut c = CopyIn::start(1, t, 0o100751, 6);
        c.data(b"abc");
        c.data(b"def");
        assert_eq!(c.finish(), Ok(6));
        assert_eq!(std::fs::read(&target).unwrap(), b"abcdef");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o751, "mode bits kept, type bits ignored");
        let mut short = CopyIn::start(2, t, 0o644, 10);
        short.data(b"xy");
        assert!(short.finish().unwrap_err().contains("after 2 of 10 bytes"));
        let mut long = CopyIn::start(3, t, 0o644, 1);
        long.data(b"xy");
        assert!(long.finish().unwrap_err().contains("more than the 1 bytes"));
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"abcdef",
            "target untouched"
        );
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left");
        let missing = CopyIn::start(4, "/nonexistent/dir/f", 0o644, 0);
        assert!(missing.finish().unwrap_err().contains("cannot create"));
    }

    #[test]
    fn copy_out_streams_or_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mut got = Vec::new();
        copy_out(path.to_str().unwrap(), &mut |r| {
            got.push(r);
            Ok(())
        })
        .unwrap();
        assert!(matches!(got[0], Response::FileInfo { size: 200_000, .. }));
        assert_eq!(got.last(), Some(&Response::Done(200_000)));
        assert_eq!(file_bytes(&got), data);
        for (path, text) in [
            ("/nonexistent/x", "cannot open /nonexistent/x"),
            (dir.path().to_str().unwrap(), "not a regular file"),
        ] {
            let mut got = Vec::new();
            copy_out(path, &mut |r| {
                got.push(r);
                Ok(())
            })
            .unwrap();
            assert!(
                matches!(&got[..], [Response::Error(e)] if e.contains(text)),
                "{got:?}"
            );
        }
    }
}
