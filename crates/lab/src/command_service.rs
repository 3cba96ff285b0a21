//! The lab's command service: every host of a multi-host lab listens on
//! [`COMMAND_PORT`](crate::network::COMMAND_PORT); `vhpc lab on K -- CMD` connects to host K,
//! sends the command, and gets the agent protocol's frames back (stdout, stderr, then the exit
//! status), as from a guest's agent.
//!
//! Request: `[len u32 LE][argv]`, argv encoded as in the guest's command file (NUL-terminated
//! strings). Response: [`Frame`]s until the connection closes. Unauthenticated: it exists only
//! inside emulated hosts, on the lab's private segment.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};

use vhpc_guest::protocol::{Frame, decode_argv, encode_argv};
use vhpc_guest::relay::{self, Reap};

use crate::LabError;

/// Largest request accepted (a command line, not a file transfer).
pub const MAX_REQUEST: u32 = 1 << 20;
/// Status reported when the request itself is unusable.
const BAD_REQUEST_STATUS: i32 = 125;

/// Serves requests on `port` (all addresses) until the host powers off; one thread each.
pub fn serve(port: u16) -> Result<(), LabError> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(LabError::io(format!("cannot listen on TCP port {port}")))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            if let Err(err) = handle(stream) {
                log::warn!("lab command service: {err}");
            }
        });
    }
    Ok(())
}

fn handle(mut stream: TcpStream) -> io::Result<()> {
    let argv = match read_request(&mut stream) {
        Ok(argv) => argv,
        Err(msg) => {
            let mut sink = &stream;
            let _ = relay::send(&mut sink, &Frame::Error(msg));
            let _ = relay::send(&mut sink, &Frame::Exit(BAD_REQUEST_STATUS));
            return Ok(());
        }
    };
    relay::run_command(&argv, &mut stream, Reap::Child).map_err(io::Error::other)?;
    stream.flush()
}

fn read_request(stream: &mut impl Read) -> Result<Vec<String>, String> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    let len = u32::from_le_bytes(len);
    if len > MAX_REQUEST {
        return Err(format!(
            "request of {len} bytes is over the {MAX_REQUEST}-byte limit"
        ));
    }
    let mut body = vec![0u8; len as usize];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    decode_argv(&body).map_err(|e| format!("invalid command: {e}"))
}

/// The request bytes for `argv`.
pub fn encode_request(argv: &[String]) -> Vec<u8> {
    let body = encode_argv(argv);
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use vhpc_guest::protocol::FrameDecoder;

    fn call(port: u16, request: &[u8]) -> Vec<Frame> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(request).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        FrameDecoder::new().push(&bytes).unwrap()
    }

    #[test]
    fn runs_commands_and_refuses_bad_requests() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let stream = stream.unwrap();
                std::thread::spawn(move || handle(stream));
            }
        });
        let argv: Vec<String> = ["sh", "-c", "echo out; echo err >&2; exit 5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let frames = call(port, &encode_request(&argv));
        assert!(
            frames.contains(&Frame::Stdout(b"out\n".to_vec())),
            "{frames:?}"
        );
        assert!(
            frames.contains(&Frame::Stderr(b"err\n".to_vec())),
            "{frames:?}"
        );
        assert_eq!(frames.last(), Some(&Frame::Exit(5)));

        let frames = call(port, &(MAX_REQUEST + 1).to_le_bytes());
        assert!(
            matches!(&frames[0], Frame::Error(m) if m.contains("limit")),
            "{frames:?}"
        );
        assert_eq!(frames.last(), Some(&Frame::Exit(BAD_REQUEST_STATUS)));
        let frames = call(port, &[3, 0, 0, 0, b'a', b'b', b'c']);
        assert!(matches!(&frames[0], Frame::Error(m) if m.contains("invalid command")));
        let missing = vec!["/nonexistent/prog".to_string()];
        let frames = call(port, &encode_request(&missing));
        assert_eq!(frames.last(), Some(&Frame::Exit(127)));
    }
}
