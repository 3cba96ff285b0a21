//! A small, defensive HTTP/1.1 subset for the VM API on a Unix socket: one request per
//! connection (`Connection: close`), bodies only with `Content-Length`, bounded sizes.
//! Both ends live here: the server's parser and response writer, and the client `vhpc` uses.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

/// Most bytes of request line plus headers.
pub const MAX_HEAD: usize = 16 << 10;
/// Most header lines.
pub const MAX_HEADERS: usize = 64;
/// Largest request body (an exec request with 1 MiB of stdin, base64-encoded, fits).
pub const MAX_BODY: usize = 2 << 20;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the request line and headers exceed {MAX_HEAD} bytes or {MAX_HEADERS} lines")]
    HeadTooLarge,
    #[error("the request body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    BodyTooLarge(u64),
    #[error("chunked request bodies are not supported; send Content-Length")]
    LengthRequired,
    #[error("HTTP version {0:?} is not supported; use HTTP/1.1")]
    Version(String),
    #[error("the connection failed while reading the request: {0}")]
    Io(#[from] io::Error),
}

impl HttpError {
    /// The status to answer with; `None` when the peer is gone or silent.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::BadRequest(_) => Some(400),
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge(_) => Some(413),
            HttpError::LengthRequired => Some(411),
            HttpError::Version(_) => Some(505),
            HttpError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Some(408)
            }
            HttpError::Io(_) => None,
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError::BadRequest(msg.into())
}

/// Reads one line of the head (CRLF or LF), charging it to `budget`.
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, HttpError> {
    let mut line = Vec::new();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX) + 1;
    let n = r.take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(HttpError::HeadTooLarge);
    }
    *budget -= n;
    if line.pop() != Some(b'\n') {
        return Err(bad("the request ended in the middle of its head"));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| bad("the request head is not valid UTF-8"))
}

/// Reads and checks one request. `Ok(None)`: the peer closed without sending anything.
pub fn read_request(r: &mut impl BufRead) -> Result<Option<Request>, HttpError> {
    let mut budget = MAX_HEAD;
    let Some(line) = read_line(r, &mut budget)? else {
        return Ok(None);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!(
            "malformed request line {line:?}; expected METHOD PATH HTTP/1.1"
        )));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad(format!("malformed method {method:?}")));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(bad(format!(
            "malformed path {target:?}; it must start with '/'"
        )));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Version(version.to_owned()));
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    let headers = read_headers(r, &mut budget)?;
    let mut request = Request {
        method: method.to_owned(),
        path,
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return Err(HttpError::LengthRequired);
    }
    if let Some(len) = request.header("content-length") {
        let len: u64 = len
            .parse()
            .map_err(|_| bad(format!("malformed Content-Length {len:?}")))?;
        if len > MAX_BODY as u64 {
            return Err(HttpError::BodyTooLarge(len));
        }
        let mut body = vec![0u8; len as usize];
        r.read_exact(&mut body).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad(format!("the body is shorter than its Content-Length {len}"))
            } else {
                HttpError::Io(e)
            }
        })?;
        request.body = body;
    }
    Ok(Some(request))
}

fn read_headers(
    r: &mut impl BufRead,
    budget: &mut usize,
) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(r, budget)? else {
            return Err(bad(
                "the request ended before the blank line after its headers",
            ));
        };
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!(
                "malformed header line {line:?}; expected Name: value"
            )));
        };
        if name.is_empty() || name.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(bad(format!("malformed header name {name:?}")));
        }
        let name = name.to_ascii_lowercase();
        let value = value.trim().to_owned();
        if name == "content-length" && headers.iter().any(|(k, _)| *k == name) {
            return Err(bad("more than one Content-Length header"));
        }
        headers.push((name, value));
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes a complete response.
pub fn write_response(
    w: &mut impl Write,
    status: u16,
    extra_headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Writes the head of a streamed response: its body ends when the connection closes.
pub fn write_stream_head(w: &mut impl Write, status: u16, content_type: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n",
        reason(status)
    );
    w.write_all(head.as_bytes())?;
    w.flush()
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}; is the VM running? (`vhpc vm list`)")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the VM's API failed: {0}")]
    Io(#[from] io::Error),
    #[error("the VM's API sent a malformed response: {0}")]
    Malformed(String),
}

/// A response whose body is still to be read from `body`.
pub struct Response {
    pub status: u16,
    pub body: BufReader<UnixStream>,
    content_length: Option<u64>,
}

impl Response {
    /// Reads the rest of the body.
    pub fn into_bytes(mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        match self.content_length {
            Some(len) => (&mut self.body).take(len).read_to_end(&mut out)?,
            None => self.body.read_to_end(&mut out)?,
        };
        Ok(out)
    }
}

/// Sends one request to the API socket at `sock`; `timeout` bounds each read and write.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(sock).map_err(|source| ClientError::Connect {
        path: sock.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let body = body.unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !body.is_empty() || method != "GET" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    read_response(BufReader::new(stream))
}

fn read_response(mut r: BufReader<UnixStream>) -> Result<Response, ClientError> {
    let mut budget = MAX_HEAD;
    let malformed = |e: HttpError| ClientError::Malformed(e.to_string());
    let line = read_line(&mut r, &mut budget)
        .map_err(malformed)?
        .ok_or_else(|| ClientError::Malformed("the connection closed without a response".into()))?;
    let status = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| ClientError::Malformed(format!("status line {line:?}")))?;
    let headers = read_headers(&mut r, &mut budget).map_err(malformed)?;
    let content_length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok());
    Ok(Response {
        status,
        body: r,
        content_length,
    })
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
