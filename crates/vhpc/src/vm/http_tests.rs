#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use super::*;

fn parse(bytes: &[u8]) -> Result<Option<Request>, HttpError> {
    read_request(&mut io::Cursor::new(bytes.to_vec()))
}

#[test]
fn parses_a_request_with_a_body() {
    let req = parse(
        b"POST /exec?x=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 4\r\n\r\n{}{}trailing",
    )
    .unwrap()
    .unwrap();
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/exec");
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.body, b"{}{}");
}

#[test]
fn accepts_bare_lf_and_http_1_0() {
    let req = parse(b"GET /vm HTTP/1.0\nHost: x\n\n").unwrap().unwrap();
    assert_eq!((req.method.as_str(), req.path.as_str()), ("GET", "/vm"));
    assert!(req.body.is_empty());
}

#[test]
fn empty_connection_is_not_an_error() {
    assert!(parse(b"").unwrap().is_none());
}

#[test]
fn malformed_requests_get_clear_statuses() {
    let long_header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
    let many_headers = format!(
        "GET / HTTP/1.1\r\n{}\r\n",
        "A: b\r\n".repeat(MAX_HEADERS + 1)
    );
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"hello\r\n\r\n".to_vec(), 400, "request line"),
        (b"GET /vm\r\n\r\n".to_vec(), 400, "request line"),
        (b"get /vm HTTP/1.1\r\n\r\n".to_vec(), 400, "method"),
        (b"GET vm HTTP/1.1\r\n\r\n".to_vec(), 400, "path"),
        (b"GET /vm HTTP/2.0\r\n\r\n".to_vec(), 505, "version"),
        (
            b"GET /vm HTTP/1.1\r\nnocolon\r\n\r\n".to_vec(),
            400,
            "header line",
        ),
        (
            b"GET /vm HTTP/1.1\r\n: v\r\n\r\n".to_vec(),
            400,
            "header name",
        ),
        (
            b"GET /vm HTTP/1.1\r\nHost: x\r\n".to_vec(),
            400,
            "blank line",
        ),
        (b"GET /vm HTTP/1.1".to_vec(), 400, "middle of its head"),
        (b"GET /\xff HTTP/1.1\r\n\r\n".to_vec(), 400, "UTF-8"),
        (
            b"POST /exec HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec(),
            400,
            "Content-Length",
        ),
        (
            b"POST /exec HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n{".to_vec(),
            400,
            "more than one",
        ),
        (
            b"POST /exec HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}".to_vec(),
            400,
            "shorter",
        ),
        (
            b"POST /exec HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
            413,
            "limit",
        ),
        (
            b"POST /exec HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            411,
            "Content-Length",
        ),
        (long_header.into_bytes(), 431, "exceed"),
        (many_headers.into_bytes(), 431, "exceed"),
    ];
    for (bytes, status, words) in cases {
        let err = parse(&bytes).unwrap_err();
        assert_eq!(
            err.status(),
            Some(status),
            "{:?}: {err}",
            String::from_utf8_lossy(&bytes)
        );
        assert!(err.to_string().contains(words), "{err} lacks {words:?}");
    }
}

#[test]
fn pseudo_random_heads_never_panic() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces: [&[u8]; 8] = [
        b"GET ",
        b"/vm",
        b" HTTP/1.1",
        b"\r\n",
        b"Content-Length: 3",
        b":",
        b"\xff",
        b"{}x",
    ];
    for _ in 0..500 {
        let mut bytes = Vec::new();
        for _ in 0..next() % 12 {
            bytes.extend_from_slice(pieces[(next() % 8) as usize]);
        }
        let _ = parse(&bytes);
    }
}

#[test]
fn responses_are_well_formed() {
    let mut out = Vec::new();
    write_response(
        &mut out,
        405,
        &[("Allow", "GET")],
        "application/json",
        b"{}",
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    );
    let mut out = Vec::new();
    write_response(&mut out, 204, &[], "application/json", b"").unwrap();
    assert!(
        String::from_utf8(out)
            .unwrap()
            .starts_with("HTTP/1.1 204 No Content\r\n")
    );
}

#[test]
fn client_and_server_over_a_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let req = read_request(&mut reader).unwrap().unwrap();
        let mut w = stream;
        write_response(&mut w, 200, &[], "text/plain", &req.body).unwrap();
    });
    let resp = call(
        &sock,
        "PUT",
        "/echo",
        Some(b"ping"),
        Some(Duration::from_secs(5)),
    )
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.into_bytes().unwrap(), b"ping");
    server.join().unwrap();
    let err = call(&tmp.path().join("none"), "GET", "/", None, None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("is the VM running"));
}
