//! The pid-1 flow: set up the system, switch to a root disk if `vhpc.root=` asks for one, run
//! the one command and report it on the agent serial port (or, with `vhpc.agent=serve` on the
//! kernel command line, serve requests over vsock until asked to stop), power off.

use std::io;
use std::path::Path;

use thiserror::Error;

use crate::kmsg;
use crate::protocol::{AGENT_TTY, COMMAND_PATH, Frame, LOAD_ORDER_PATH, decode_argv};
use crate::relay::{self, Reap, RelayError};
use crate::switch_root::{self, SwitchRootError};
use crate::tty::{self, TtyError};
use crate::{hostname, loopback, modules, mounts, serve};

/// The status reported when the guest cannot even start the command (its root disk failed):
/// the same "vhpc error" status the host's `vhpc` uses for its own failures.
const SETUP_FAILED: i32 = 125;

#[derive(Debug, Error)]
pub enum InitError {
    #[error(transparent)]
    Tty(#[from] TtyError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error(transparent)]
    SwitchRoot(#[from] SwitchRootError),
    #[error("cannot flush the agent serial port: {0}")]
    Drain(#[source] io::Error),
}

/// Runs the guest as pid 1 and powers the machine off afterwards; never returns.
///
/// Refuses to do anything unless it really is pid 1, so running it by mistake on a host
/// cannot power that host off.
pub fn run_init() -> ! {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!(
            "vhpc: the guest init must run as pid 1 (it powers the machine off); not doing it"
        );
        std::process::exit(1);
    }
    for err in mounts::mount_all() {
        kmsg::warn(&err.to_string());
    }
    ensure_std_fds();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for err in modules::load_listed(Path::new(LOAD_ORDER_PATH), &cmdline) {
        kmsg::warn(&err.to_string());
    }
    if let Err(err) = loopback::bring_up() {
        kmsg::warn(&format!("cannot bring up the loopback interface lo: {err}"));
    }
    if let Err(err) = agent() {
        kmsg::error(&format!("agent failed: {err}; powering off"));
    }
    power_off()
}

/// Switches to the root disk if asked, then serves the host over vsock (long-running VMs), or
/// runs the command and reports its output and status on the agent serial port.
fn agent() -> Result<(), InitError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if serve::requested(&cmdline) {
        if let Some(device) = switch_root::requested_device(&cmdline) {
            switch_root::switch_to(device)?;
        }
        return Ok(serve::serve_vsock()?);
    }
    // Both come from the initramfs, which a switch to the root disk empties: the command file,
    // and the tty (its fd stays valid when /dev moves into the new root).
    let command = read_command();
    let mut tty = tty::open_raw(Path::new(AGENT_TTY))?;
    if let Some(device) = switch_root::requested_device(&cmdline)
        && let Err(err) = switch_root::switch_to(device)
    {
        let msg = format!("cannot boot from the root disk: {err}");
        kmsg::error(&msg);
        relay::send(&mut tty, &Frame::Error(msg))?;
        relay::send(&mut tty, &Frame::Exit(SETUP_FAILED))?;
        return tty::drain(&tty).map_err(InitError::Drain);
    }
    if let Err(err) = hostname::set_from(Path::new("/etc/hostname")) {
        kmsg::warn(&format!(
            "cannot set the hostname from /etc/hostname: {err}"
        ));
    }
    match command {
        Ok(argv) => {
            relay::run_command(&argv, &mut tty, Reap::All)?;
        }
        Err(msg) => {
            kmsg::error(&msg);
            relay::send(&mut tty, &Frame::Error(msg))?;
            relay::send(&mut tty, &Frame::Exit(127))?;
        }
    }
    tty::drain(&tty).map_err(InitError::Drain)
}

/// Reads and decodes the command file; the error is the text for the host.
fn read_command() -> Result<Vec<String>, String> {
    let bytes = std::fs::read(COMMAND_PATH).map_err(|err| {
        format!(
            "no command to run: cannot read {COMMAND_PATH}: {err}; the host must append a \
             command archive to the initramfs"
        )
    })?;
    decode_argv(&bytes)
        .map_err(|err| format!("no command to run: {COMMAND_PATH} is invalid: {err}"))
}

/// Makes sure fds 0-2 are open: the kernel leaves them closed when it finds no console, and
/// a later open (say, of the agent tty) must not become "stderr".
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any integer is harmless; it only reports whether the fd is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        for path in [c"/dev/console", c"/dev/null"] {
            // SAFETY: `path` is a valid NUL-terminated string; open returns a new fd or -1.
            let opened = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if opened < 0 {
                continue;
            }
            if opened != fd {
                // SAFETY: both fds are valid: `opened` was just opened, `fd` is a small
                // integer dup2 may (re)define; `opened` is ours to close afterwards.
                unsafe {
                    libc::dup2(opened, fd);
                    libc::close(opened);
                }
            }
            break;
        }
    }
}

/// Syncs file systems and powers off. If even that fails, exits, which makes the kernel
/// panic: the host then at least sees the guest stop.
fn power_off() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    switch_root::remount_root_read_only();
    // SAFETY: reboot with a valid command constant; as pid 1 with CAP_SYS_BOOT it does not
    // return on success.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    kmsg::error(&format!("power off failed: {}", io::Error::last_os_error()));
    std::process::exit(1)
}
