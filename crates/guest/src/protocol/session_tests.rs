#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use super::*;

fn requests() -> Vec<Message<Request>> {
    vec![
        Message {
            id: 1,
            body: Request::Ping,
        },
        Message {
            id: 2,
            body: Request::Exec {
                argv: vec!["sh".into(), "-c".into(), "echo é".into(), String::new()],
                stdin: vec![0xA6, 1, 0, 0, 0xff],
            },
        },
        Message {
            id: 3,
            body: Request::CopyInStart {
                path: "/tmp/é f".into(),
                mode: 0o755,
                size: 1 << 40,
            },
        },
        Message {
            id: 3,
            body: Request::CopyInData(vec![0xA6; MAX_CHUNK]),
        },
        Message {
            id: 3,
            body: Request::CopyInEnd,
        },
        Message {
            id: 4,
            body: Request::CopyOut {
                path: "/etc/hostname".into(),
            },
        },
        Message {
            id: 5,
            body: Request::Freeze {
                mount_points: vec!["/mnt".into(), "/".into()],
                timeout_secs: 30,
            },
        },
        Message {
            id: 6,
            body: Request::Freeze {
                mount_points: vec![],
                timeout_secs: 0,
            },
        },
        Message {
            id: 7,
            body: Request::Thaw,
        },
        Message {
            id: u32::MAX,
            body: Request::PowerOff,
        },
    ]
}

fn responses() -> Vec<Message<Response>> {
    let bodies = vec![
        Response::Ready {
            agent_version: "0.1.0".into(),
        },
        Response::Health(Health {
            uptime_ms: 12_345,
            load_milli: [10, 20, 3000],
            mem_total_kib: 1 << 20,
            mem_available_kib: 1 << 19,
        }),
        Response::Stdout(b"hello\n".to_vec()),
        Response::Stderr(Vec::new()),
        Response::Error("exec failed".into()),
        Response::Exit(-1),
        Response::PowerOffAck,
        Response::FileInfo {
            mode: 0o4755,
            size: u64::MAX,
        },
        Response::FileData(vec![1, 2, 3]),
        Response::Done(10 << 20),
        Response::Frozen(vec!["/mnt".into()]),
        Response::Thawed(vec![]),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Message { id: i as u32, body })
        .collect()
}

fn encode_requests(messages: &[Message<Request>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        encode_request(m.id, &m.body, &mut out).unwrap();
    }
    out
}

fn encode_responses(messages: &[Message<Response>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        encode_response(m.id, &m.body, &mut out);
    }
    out
}

#[test]
fn header_layout() {
    let mut out = Vec::new();
    encode_response(0x0102_0304, &Response::Exit(7), &mut out);
    assert_eq!(out, [0xA6, 2, 0x45, 0, 4, 3, 2, 1, 4, 0, 0, 0, 7, 0, 0, 0]);
}

#[test]
fn requests_roundtrip_split_anywhere() {
    let messages = requests();
    let bytes = encode_requests(&messages);
    for cut in 0..=bytes.len() {
        let mut dec = Decoder::<Request>::new();
        let mut got = dec.push(&bytes[..cut]).unwrap();
        got.extend(dec.push(&bytes[cut..]).unwrap());
        assert_eq!(got, messages, "split at {cut}");
        assert_eq!(dec.pending_bytes(), 0);
    }
}

#[test]
fn responses_roundtrip_byte_at_a_time() {
    let messages = responses();
    let mut dec = Decoder::<Response>::new();
    let mut got = Vec::new();
    for b in encode_responses(&messages) {
        got.extend(dec.push(&[b]).unwrap());
    }
    assert_eq!(got, messages);
}

#[test]
fn long_output_is_chunked() {
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut out = Vec::new();
    encode_response(9, &Response::Stdout(data.clone()), &mut out);
    let got = Decoder::<Response>::new().push(&out).unwrap();
    assert_eq!(got.len(), 3);
    let joined: Vec<u8> = got
        .into_iter()
        .flat_map(|m| match m.body {
            Response::Stdout(d) => d,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(joined, data);
}

#[test]
fn bad_requests_are_refused_before_sending() {
    let mut out = Vec::new();
    let empty = Request::Exec {
        argv: vec![],
        stdin: vec![],
    };
    assert!(matches!(
        encode_request(1, &empty, &mut out),
        Err(SessionError::Argv(_))
    ));
    let huge = Request::Exec {
        argv: vec!["cat".into()],
        stdin: vec![0; MAX_REQUEST_PAYLOAD],
    };
    assert!(matches!(
        encode_request(1, &huge, &mut out),
        Err(SessionError::RequestTooLarge { .. })
    ));
    assert!(out.is_empty());
}

#[test]
fn malformed_frames_give_clear_errors() {
    type Check = fn(&SessionError) -> bool;
    let header = |kind: u8, len: u32| {
        let mut h = vec![MAGIC, VERSION, kind, 0, 1, 0, 0, 0];
        h.extend_from_slice(&len.to_le_bytes());
        h
    };
    let with = |mut h: Vec<u8>, p: &[u8]| {
        h.extend_from_slice(p);
        h
    };
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (b"GET /".to_vec(), |e| {
            matches!(e, SessionError::BadMagic { byte: b'G', .. })
        }),
        (vec![MAGIC, 1], |e| {
            matches!(e, SessionError::Version { got: 1 })
        }),
        (
            with(header(COPY_IN_START, 12), &[0; 12]),
            |e| matches!(e, SessionError::BadPayload { kind: COPY_IN_START, detail, .. } if detail.contains("absolute")),
        ),
        (with(header(COPY_IN_START, 4), &[0; 4]), |e| {
            matches!(
                e,
                SessionError::BadPayload {
                    kind: COPY_IN_START,
                    ..
                }
            )
        }),
        (with(header(COPY_OUT, 3), b"a/b"), |e| {
            matches!(e, SessionError::BadPayload { kind: COPY_OUT, .. })
        }),
        (with(header(COPY_OUT, 3), b"/\0b"), |e| {
            matches!(e, SessionError::BadPayload { kind: COPY_OUT, .. })
        }),
        (
            with(
                header(COPY_IN_DATA, MAX_CHUNK as u32 + 1),
                &[0; MAX_CHUNK + 1],
            ),
            |e| {
                matches!(
                    e,
                    SessionError::BadPayload {
                        kind: COPY_IN_DATA,
                        ..
                    }
                )
            },
        ),
        (with(header(COPY_IN_END, 1), &[0]), |e| {
            matches!(
                e,
                SessionError::BadPayload {
                    kind: COPY_IN_END,
                    ..
                }
            )
        }),
        (with(header(FREEZE, 2), &[0, 0]), |e| {
            matches!(e, SessionError::BadPayload { kind: FREEZE, .. })
        }),
        (
            with(header(FREEZE, 6), &[0, 0, 0, 0, b'/', b'm']),
            |e| matches!(e, SessionError::BadPayload { kind: FREEZE, detail, .. } if detail.contains("NUL")),
        ),
        (with(header(FREEZE, 7), &[0, 0, 0, 0, b'm', b'/', 0]), |e| {
            matches!(e, SessionError::BadPayload { kind: FREEZE, .. })
        }),
        (with(header(THAW, 1), &[0]), |e| {
            matches!(e, SessionError::BadPayload { kind: THAW, .. })
        }),
        (header(FROZEN, 0), |e| {
            matches!(e, SessionError::UnknownKind { kind: FROZEN, .. })
        }),
        (vec![MAGIC, VERSION, PING, 1], |e| {
            matches!(e, SessionError::Flags { flags: 1, .. })
        }),
        (header(0x99, 0), |e| {
            matches!(e, SessionError::UnknownKind { kind: 0x99, .. })
        }),
        (header(READY, 0), |e| {
            matches!(e, SessionError::UnknownKind { kind: READY, .. })
        }),
        (header(EXEC, u32::MAX), |e| {
            matches!(e, SessionError::Oversize { .. })
        }),
        (with(header(PING, 1), &[0]), |e| {
            matches!(e, SessionError::BadPayload { kind: PING, .. })
        }),
        (with(header(EXEC, 2), &[0, 0]), |e| {
            matches!(e, SessionError::BadPayload { kind: EXEC, .. })
        }),
        (with(header(EXEC, 4), &[9, 0, 0, 0]), |e| {
            matches!(e, SessionError::BadPayload { kind: EXEC, .. })
        }),
        (with(header(EXEC, 7), &[3, 0, 0, 0, b'l', b's', 0]), |_| {
            false
        }),
    ];
    for (bytes, check) in cases {
        match Decoder::<Request>::new().push(&bytes) {
            Err(err) => {
                assert!(check(&err), "{bytes:?} gave {err:?}");
                assert!(!err.to_string().is_empty());
            }
            Ok(got) => assert_eq!(
                got,
                vec![Message {
                    id: 1,
                    body: Request::Exec {
                        argv: vec!["ls".into()],
                        stdin: vec![]
                    }
                }],
                "{bytes:?}"
            ),
        }
    }
    let bad_responses: Vec<Vec<u8>> = vec![
        with(header(FILE_INFO, 8), &[0; 8]),
        with(header(DONE, 4), &[0; 4]),
        with(header(THAWED, 2), b"/x"),
        with(header(COPY_OUT, 2), b"/x"),
        with(header(EXIT, 2), &[0, 0]),
        with(header(HEALTH, 3), &[0, 0, 0]),
        with(header(ERROR, 1), &[0xff]),
        with(header(READY, 65), &[b'x'; 65]),
        with(header(STDOUT, 5000), &[0; 5000]),
        header(PING, 0),
    ];
    for bytes in bad_responses {
        assert!(
            Decoder::<Response>::new().push(&bytes).is_err(),
            "{bytes:?}"
        );
    }
}

#[test]
fn errors_are_sticky_after_good_frames() {
    let mut bytes = encode_responses(&responses()[..2]);
    bytes.push(0);
    let mut dec = Decoder::<Response>::new();
    assert_eq!(dec.push(&bytes).unwrap().len(), 2);
    assert!(matches!(
        dec.push(&[]),
        Err(SessionError::BadMagic { byte: 0, .. })
    ));
    assert!(dec.push(&encode_responses(&responses())).is_err());
}

/// xorshift64: deterministic pseudo-random numbers for the decoder's random inputs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A cheap stand-in for a fuzzer: random bytes biased towards plausible headers, plus valid
/// streams with random bytes flipped, fed in random pieces to both decoders.
#[test]
fn pseudo_random_input_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let valid_req = encode_requests(&requests());
    let valid_resp = encode_responses(&responses());
    for round in 0..600 {
        let bytes: Vec<u8> = match round % 3 {
            0 => {
                let len = (rng.next() % 96) as usize;
                (0..len)
                    .map(|i| match (i % HEADER_LEN, rng.next() % 4) {
                        (0, 0..=2) => MAGIC,
                        (1, 0..=2) => VERSION,
                        (2, 0..=1) => {
                            [PING, EXEC, POWER_OFF, READY, EXIT, STDOUT][(rng.next() % 6) as usize]
                        }
                        (3, 0..=2) => 0,
                        (9..=11, 0..=2) => 0,
                        (8, 0..=2) => (rng.next() % 24) as u8,
                        _ => rng.next() as u8,
                    })
                    .collect()
            }
            1 => flip(&valid_req, &mut rng),
            _ => flip(&valid_resp, &mut rng),
        };
        let mut requests = Decoder::<Request>::new();
        let mut responses = Decoder::<Response>::new();
        for chunk in bytes.chunks(1 + (rng.next() % 13) as usize) {
            let _ = requests.push(chunk);
            let _ = responses.push(chunk);
        }
        assert!(requests.pending_bytes() <= HEADER_LEN + MAX_REQUEST_PAYLOAD);
        assert!(responses.pending_bytes() <= HEADER_LEN + MAX_RESPONSE_PAYLOAD);
    }
}

fn flip(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    for _ in 0..1 + rng.next() % 3 {
        let at = (rng.next() as usize) % bytes.len();
        bytes[at] = rng.next() as u8;
    }
    bytes
}
