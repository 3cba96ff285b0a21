//! The hostname from /etc/hostname, set at boot as a distribution's init does: a root file
//! system from `vhpc image rootfs` names its guest, and programs such as Open MPI's mpirun
//! refuse to run on a machine called "(none)", the kernel's default.

use std::io;
use std::path::Path;

/// Sets the hostname from `path` if it holds one; does nothing if there is no such file.
pub(crate) fn set_from(path: &Path) -> io::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(name) = parse(&text) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds no valid hostname", path.display()),
        ));
    };
    // SAFETY: `name` points to `name.len()` valid bytes for the duration of the call;
    // sethostname only reads them.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first non-comment line, if it is a valid hostname (letters, digits, '-', '.'; at most
/// 64 bytes).
fn parse(text: &str) -> Option<&str> {
    let name = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let valid = name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    valid.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_file_parsing() {
        assert_eq!(parse("vhpc-guest\n"), Some("vhpc-guest"));
        assert_eq!(
            parse("# comment\n\n  node-1.cluster \n"),
            Some("node-1.cluster")
        );
        assert_eq!(parse(""), None);
        assert_eq!(parse("bad name\n"), None);
        assert_eq!(parse(&"x".repeat(65)), None);
        assert!(set_from(Path::new("/nonexistent/hostname")).is_ok());
    }
}
