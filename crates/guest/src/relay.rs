//! Runs the command and relays its output as protocol frames.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::protocol::{Frame, MAX_PAYLOAD, encode};

/// Environment of the command, on top of what the kernel passed to /init.
pub const CHILD_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("TERM", "linux"),
];

/// How often the relay checks whether the command has exited while its pipes stay open.
const CHILD_CHECK: Duration = Duration::from_millis(100);
/// After the command exits, output still arriving (from background processes holding its
/// pipes) is relayed for at most this long.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("cannot write to the agent channel: {0}; the host stopped listening")]
    Sink(#[source] io::Error),
    #[error("cannot read the command's {stream}: {source}")]
    Read {
        stream: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("poll on the command's output failed: {0}")]
    Poll(#[source] io::Error),
    #[error("cannot wait for the command (pid {pid}): {source}")]
    Wait {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// Which exited processes the relay collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reap {
    /// Only the command itself (any process that is not pid 1).
    Child,
    /// Every exited process: pid 1 inherits all orphans and must reap them.
    All,
}

/// Runs `argv` and relays its stdout/stderr to `sink` as frames, then an `Exit` frame.
///
/// A command that cannot be started is reported as an `Error` frame followed by `Exit(127)`
/// (not found) or `Exit(126)` (any other reason), like a shell does. Returns the exit status.
pub fn run_command(argv: &[String], sink: &mut impl Write, reap: Reap) -> Result<i32, RelayError> {
    run_command_with_stdin(argv, &[], sink, reap)
}

/// [`run_command`] with `stdin` as the command's standard input (empty: /dev/null). The bytes
/// are written from a helper thread, so a command that writes before it reads cannot block
/// the relay.
pub fn run_command_with_stdin(
    argv: &[String],
    stdin: &[u8],
    sink: &mut impl Write,
    reap: Reap,
) -> Result<i32, RelayError> {
    let status = match spawn(argv, !stdin.is_empty()) {
        Ok(mut child) => {
            if let Some(mut pipe) = child.stdin.take() {
                let bytes = stdin.to_vec();
                // A command that exits without reading all of it closes the pipe: not an error.
                std::thread::spawn(move || {
                    let _ = pipe.write_all(&bytes);
                });
            }
            relay(&mut child, sink, reap)?
        }
        Err(err) => {
            let status = if err.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let program = argv.first().map_or("", String::as_str);
            send(
                sink,
                &Frame::Error(format!("exec {program:?} failed: {err}")),
            )?;
            status
        }
    };
    send(sink, &Frame::Exit(status))?;
    sink.flush().map_err(RelayError::Sink)?;
    Ok(status)
}

/// Sends one frame.
pub fn send(sink: &mut impl Write, frame: &Frame) -> Result<(), RelayError> {
    let mut bytes = Vec::new();
    encode(frame, &mut bytes);
    sink.write_all(&bytes).map_err(RelayError::Sink)
}

fn spawn(argv: &[String], piped_stdin: bool) -> io::Result<Child> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let cwd = if Path::new("/root").is_dir() {
        "/root"
    } else {
        "/"
    };
    Command::new(program)
        .args(args)
        .envs(CHILD_ENV.iter().copied())
        .current_dir(cwd)
        .stdin(if piped_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// One of the command's output pipes.
struct Stream {
    file: File,
    name: &'static str,
    frame: fn(Vec<u8>) -> Frame,
}

/// Relays `child`'s piped stdout and stderr until both reach EOF (or the command has exited
/// and its pipes fell quiet), then reaps it and returns its status.
fn relay(child: &mut Child, sink: &mut impl Write, reap: Reap) -> Result<i32, RelayError> {
    let pid = i32::try_from(child.id()).expect("Linux pids fit in i32");
    let mut streams = Vec::new();
    if let Some(out) = child.stdout.take() {
        let file = File::from(OwnedFd::from(out));
        streams.push(Stream {
            file,
            name: "stdout",
            frame: Frame::Stdout,
        });
    }
    if let Some(err) = child.stderr.take() {
        let file = File::from(OwnedFd::from(err));
        streams.push(Stream {
            file,
            name: "stderr",
            frame: Frame::Stderr,
        });
    }
    let mut status = None;
    let result = pump(&mut streams, pid, sink, reap, &mut status);
    if result.is_err() && status.is_none() {
        // The host is gone or the pipes broke: do not leave the command running unobserved.
        let _ = child.kill();
        let _ = wait_for(pid, reap, true);
    }
    result?;
    let status = match status {
        Some(status) => status,
        None => wait_for(pid, reap, true)?.expect("a blocking wait returns a status"),
    };
    if reap == Reap::All {
        reap_orphans();
    }
    Ok(status)
}

/// The poll loop; sets `status` as soon as the command has been reaped.
fn pump(
    streams: &mut Vec<Stream>,
    pid: i32,
    sink: &mut impl Write,
    reap: Reap,
    status: &mut Option<i32>,
) -> Result<(), RelayError> {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut drain_until: Option<Instant> = None;
    while !streams.is_empty() {
        let timeout = if drain_until.is_some() {
            0
        } else {
            CHILD_CHECK.as_millis() as i32
        };
        let ready = poll_readable(streams, timeout)?;
        if drain_until.is_some_and(|t| ready.iter().all(|r| !r) || Instant::now() >= t) {
            break;
        }
        let mut keep = Vec::with_capacity(streams.len());
        for (stream, is_ready) in streams.iter_mut().zip(ready) {
            keep.push(!is_ready || read_once(stream, &mut buf, sink)?);
        }
        let mut flags = keep.into_iter();
        streams.retain(|_| flags.next().unwrap_or(true));
        if status.is_none() {
            *status = wait_for(pid, reap, false)?;
            if status.is_some() {
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
        }
    }
    Ok(())
}

/// Polls the streams; returns which are readable (or at EOF / in error).
fn poll_readable(streams: &[Stream], timeout_ms: i32) -> Result<Vec<bool>, RelayError> {
    let mut fds: Vec<libc::pollfd> = streams
        .iter()
        .map(|s| libc::pollfd {
            fd: s.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let nfds = libc::nfds_t::try_from(fds.len()).expect("at most two fds");
        // SAFETY: `fds` is a valid, exclusively borrowed array of `nfds` pollfd structs whose
        // fds stay open (owned by `streams`) for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout_ms) };
        if rc >= 0 {
            return Ok(fds.iter().map(|fd| fd.revents != 0).collect());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(RelayError::Poll(err));
        }
    }
}

/// Reads once from a ready stream and forwards the bytes; `false` at EOF.
fn read_once(
    stream: &mut Stream,
    buf: &mut [u8],
    sink: &mut impl Write,
) -> Result<bool, RelayError> {
    match stream.file.read(buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            send(sink, &(stream.frame)(buf[..n].to_vec()))?;
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(source) => Err(RelayError::Read {
            stream: stream.name,
            source,
        }),
    }
}

/// Collects the command's status if it has exited (or, with `block`, once it exits).
/// With [`Reap::All`], orphans that exited meanwhile are collected along the way.
fn wait_for(pid: i32, reap: Reap, block: bool) -> Result<Option<i32>, RelayError> {
    let target = if reap == Reap::All { -1 } else { pid };
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        let mut raw = 0;
        // SAFETY: `raw` is a valid out-pointer for the status; waitpid touches nothing else.
        let got = unsafe { libc::waitpid(target, &mut raw, flags) };
        if got == pid {
            return Ok(Some(decode_status(raw)));
        }
        if got == 0 {
            return Ok(None);
        }
        if got < 0 {
            let source = io::Error::last_os_error();
            if source.kind() != io::ErrorKind::Interrupted {
                return Err(RelayError::Wait { pid, source });
            }
        }
        // Otherwise an orphan was reaped (Reap::All) or the wait was interrupted: go on.
    }
}

/// Collects every already-exited process (pid 1 duty).
fn reap_orphans() {
    loop {
        let mut raw = 0;
        // SAFETY: `raw` is a valid out-pointer for the status; waitpid touches nothing else.
        let got = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if got <= 0 {
            return;
        }
    }
}

/// Maps a wait status to a shell-style status: exit code, or 128 + signal number.
fn decode_status(raw: libc::c_int) -> i32 {
    if libc::WIFEXITED(raw) {
        libc::WEXITSTATUS(raw)
    } else if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        255
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::protocol::FrameDecoder;

    fn run(argv: &[&str]) -> (i32, Vec<Frame>) {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let mut sink = Vec::new();
        let status = run_command(&argv, &mut sink, Reap::Child).unwrap();
        (status, FrameDecoder::new().push(&sink).unwrap())
    }

    /// Joins the stdout and stderr payloads and returns the trailing frame.
    fn collect(frames: &[Frame]) -> (Vec<u8>, Vec<u8>, Vec<String>, Option<&Frame>) {
        let (mut out, mut err, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for frame in frames {
            match frame {
                Frame::Stdout(d) => out.extend_from_slice(d),
                Frame::Stderr(d) => err.extend_from_slice(d),
                Frame::Error(e) => errors.push(e.clone()),
                Frame::Exit(_) => {}
            }
        }
        (out, err, errors, frames.last())
    }

    #[test]
    fn relays_stdout_stderr_and_status() {
        let (status, frames) = run(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
        assert_eq!(status, 3);
        let (out, err, errors, last) = collect(&frames);
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert!(errors.is_empty());
        assert_eq!(last, Some(&Frame::Exit(3)));
    }

    #[test]
    fn large_output_arrives_intact() {
        let (status, frames) = run(&["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]);
        assert_eq!(status, 0);
        let (out, _, _, _) = collect(&frames);
        assert_eq!(out.len(), 100_000);
        assert!(out.iter().all(|&b| b == b'x'));
    }

    #[test]
    fn killed_by_signal_is_128_plus_signal() {
        let (status, frames) = run(&["sh", "-c", "kill -9 $$"]);
        assert_eq!(status, 137);
        assert_eq!(frames.last(), Some(&Frame::Exit(137)));
    }

    #[test]
    fn missing_program_is_127_with_error() {
        let (status, frames) = run(&["/nonexistent/program"]);
        assert_eq!(status, 127);
        let (_, _, errors, last) = collect(&frames);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("exec"), "{}", errors[0]);
        assert_eq!(last, Some(&Frame::Exit(127)));
    }

    #[test]
    fn non_executable_is_126() {
        let (status, _) = run(&["/dev/null"]);
        assert_eq!(status, 126);
    }

    #[test]
    fn stdin_is_empty_and_env_is_set() {
        let (status, frames) = run(&["sh", "-c", "cat; echo \"$HOME:$TERM\""]);
        assert_eq!(status, 0);
        assert_eq!(collect(&frames).0, b"/root:linux\n");
    }

    #[test]
    fn background_process_holding_pipes_does_not_hang() {
        let start = Instant::now();
        let (status, frames) = run(&["sh", "-c", "sleep 5 & echo done"]);
        assert_eq!(status, 0);
        assert_eq!(collect(&frames).0, b"done\n");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn sink_failure_is_reported() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "echo hi; sleep 30".to_owned(),
        ];
        let start = Instant::now();
        let err = run_command(&argv, &mut Broken, Reap::Child).unwrap_err();
        assert!(matches!(err, RelayError::Sink(_)));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn status_decoding() {
        assert_eq!(decode_status(0), 0);
        assert_eq!(decode_status(3 << 8), 3);
        assert_eq!(decode_status(9), 137);
    }
}
