#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::Value;
use vhpc_api::rest::VmRunState;
use vhpc_api::{MemoryConfig, VmConfig};

use super::*;

/// A VM stand-in: pause/resume flip a flag, exec echoes its argv.
struct Fake {
    state: Mutex<VmRunState>,
}

impl Fake {
    fn new(state: VmRunState) -> Self {
        Fake {
            state: Mutex::new(state),
        }
    }
    fn running(&self) -> Result<(), ApiError> {
        match *self.state.lock().unwrap() {
            VmRunState::Running => Ok(()),
            other => Err(ApiError::new(409, format!("the VM is {}", other.as_str()))),
        }
    }
}

impl Backend for Fake {
    fn info(&self) -> VmInfo {
        VmInfo {
            name: "a".into(),
            state: *self.state.lock().unwrap(),
            pid: 42,
            agent_version: Some("0.1.0".into()),
            config: VmConfig {
                vcpus: 2,
                memory: MemoryConfig {
                    size_mib: 512,
                    hugepages: false,
                    prefault: false,
                },
                kernel: PathBuf::from("/k"),
                initramfs: Some(PathBuf::from("/i")),
                cmdline: "console=ttyS0".into(),
                disks: Vec::new(),
                nets: Vec::new(),
            },
        }
    }
    fn copy_in(&self, request: CopyInRequest) -> Result<CopyResult, ApiError> {
        self.running()?;
        if !request.host_path.starts_with('/') {
            return Err(ApiError::new(400, "host_path must be absolute"));
        }
        Ok(CopyResult {
            bytes: 3,
            mode: 0o644,
        })
    }
    fn copy_out(&self, request: CopyOutRequest) -> Result<CopyResult, ApiError> {
        self.running()?;
        if request.guest_path == "/missing" {
            return Err(ApiError::new(422, "in the guest: cannot open /missing"));
        }
        Ok(CopyResult {
            bytes: 5,
            mode: 0o600,
        })
    }
    fn freeze(&self, request: FreezeRequest) -> Result<FreezeResult, ApiError> {
        self.running()?;
        let frozen = if request.mount_points.is_empty() {
            vec!["/mnt".into()]
        } else {
            request.mount_points
        };
        Ok(FreezeResult { frozen })
    }
    fn thaw(&self) -> Result<ThawResult, ApiError> {
        self.running()?;
        Ok(ThawResult {
            thawed: vec!["/mnt".into()],
        })
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.running()?;
        *self.state.lock().unwrap() = VmRunState::Paused;
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        let mut state = self.state.lock().unwrap();
        if *state != VmRunState::Paused {
            return Err(ApiError::new(409, "the VM is not paused"));
        }
        *state = VmRunState::Running;
        Ok(())
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        *self.state.lock().unwrap() = VmRunState::Stopping;
        Ok(())
    }
    fn health(&self) -> Result<Health, ApiError> {
        self.running()?;
        Ok(Health {
            agent_version: "0.1.0".into(),
            uptime_secs: 1.5,
            load: [0.1, 0.2, 0.3],
            mem_total_kib: 1000,
            mem_available_kib: 500,
        })
    }
    fn migrate(
        &self,
        request: MigrateRequest,
        event: &mut dyn FnMut(MigrateEvent) -> io::Result<()>,
    ) -> Result<(), ApiError> {
        match *self.state.lock().unwrap() {
            VmRunState::Running | VmRunState::Paused => {}
            other => return Err(ApiError::new(409, format!("the VM is {}", other.as_str()))),
        }
        if request.to.starts_with("unreachable") {
            return Err(ApiError::new(502, "cannot reach the destination"));
        }
        let progress = vhpc_api::rest::MigrateProgress {
            phase: "first-round".into(),
            round: 0,
            pages_sent: 10,
            remaining_pages: 100,
            elapsed_ms: 5,
        };
        let done = vhpc_api::rest::MigrateDone {
            rounds: 2,
            pages_sent: 120,
            final_pages: 3,
            total_ms: 40.0,
            downtime_ms: 2.5,
        };
        for e in [
            MigrateEvent {
                progress: Some(progress),
                ..Default::default()
            },
            MigrateEvent {
                done: Some(done),
                ..Default::default()
            },
        ] {
            event(e).map_err(|e| ApiError::new(500, e.to_string()))?;
        }
        Ok(())
    }
    fn snapshot(&self, request: SnapshotRequest) -> Result<SnapshotResponse, ApiError> {
        if !request.dir.starts_with('/') {
            return Err(ApiError::new(400, "dir must be an absolute path"));
        }
        if request.incremental {
            return Err(ApiError::new(409, "no previous checkpoint"));
        }
        self.running()?;
        Ok(SnapshotResponse {
            id: "00ff".into(),
            dir: request.dir,
            parent: None,
            memory_pages: 10,
            state_bytes: 100,
            paused_ms: 1.5,
            stopped: request.stop,
        })
    }
    fn end_after_snapshot(&self) {
        *self.state.lock().unwrap() = VmRunState::Stopping;
    }
    fn exec(
        &self,
        request: ExecRequest,
        event: &mut dyn FnMut(ExecEvent) -> io::Result<()>,
    ) -> Result<(), ApiError> {
        self.running()?;
        let out = request.argv.join(" ");
        for e in [
            ExecEvent {
                stdout: Some(out),
                ..Default::default()
            },
            ExecEvent {
                stderr: Some("ZQ==".into()),
                ..Default::default()
            },
            ExecEvent {
                exit_status: Some(3),
                ..Default::default()
            },
        ] {
            event(e).map_err(|e| ApiError::new(500, e.to_string()))?;
        }
        Ok(())
    }
}

/// Sends raw request bytes through the parser and the router; returns status and body.
fn call_raw(backend: &dyn Backend, raw: &[u8]) -> (u16, Vec<u8>) {
    let mut out = Vec::new();
    match http::read_request(&mut io::Cursor::new(raw.to_vec())) {
        Ok(Some(req)) => respond(&req, backend, &mut out).unwrap(),
        Ok(None) => panic!("empty request"),
        Err(e) => send_error(&mut out, &ApiError::new(e.status().unwrap(), e.to_string())).unwrap(),
    }
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, body.as_bytes().to_vec())
}

fn call(backend: &dyn Backend, method: &str, path: &str, body: &str) -> (u16, Vec<u8>) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    call_raw(backend, raw.as_bytes())
}

fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body).unwrap().error
}

#[test]
fn routes_pause_resume_and_conflicts() {
    let fake = Fake::new(VmRunState::Running);
    assert_eq!(call(&fake, "PUT", "/vm/pause", "").0, 204);
    let (status, body) = call(&fake, "PUT", "/vm/pause", "");
    assert_eq!(status, 409);
    assert!(error_text(&body).contains("paused"));
    assert_eq!(call(&fake, "POST", "/exec", r#"{"argv":["true"]}"#).0, 409);
    assert_eq!(call(&fake, "PUT", "/vm/resume", "").0, 204);
    assert_eq!(call(&fake, "PUT", "/vm/shutdown", "").0, 202);
}

#[test]
fn bad_requests_get_400_404_405_and_the_server_goes_on() {
    let fake = Fake::new(VmRunState::Running);
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("GET", "/nope", "", 404, "no such path"),
        ("DELETE", "/vm", "", 405, "use GET"),
        ("GET", "/exec", "", 405, "use POST"),
        ("POST", "/exec", "{", 400, "invalid exec request body"),
        ("POST", "/exec", "[]", 400, "invalid exec request body"),
        (
            "POST",
            "/exec",
            r#"{"argv":"ls"}"#,
            400,
            "invalid exec request body",
        ),
        (
            "POST",
            "/exec",
            r#"{"argv":["ls"],"bogus":1}"#,
            400,
            "unknown field",
        ),
        ("POST", "/exec", "", 400, "invalid exec request body"),
    ];
    for (method, path, body, status, words) in cases {
        let (got, resp) = call(&fake, method, path, body);
        assert_eq!(got, *status, "{method} {path} {body}");
        assert!(error_text(&resp).contains(words), "{}", error_text(&resp));
    }
    let (status, body) = call_raw(&fake, b"BOGUS\r\n\r\n");
    assert_eq!(status, 400);
    assert!(error_text(&body).contains("request line"));
    assert_eq!(call(&fake, "GET", "/vm", "").0, 200, "still serving");
}

#[test]
fn snapshot_answers_what_was_written_and_a_stop_ends_the_vmm_after_the_answer() {
    let fake = Fake::new(VmRunState::Running);
    let (status, body) = call(&fake, "PUT", "/vm/snapshot", r#"{"dir":"/c","stop":true}"#);
    assert_eq!(status, 200);
    let info: SnapshotResponse = serde_json::from_slice(&body).unwrap();
    assert!(info.stopped);
    assert_eq!(*fake.state.lock().unwrap(), VmRunState::Stopping);
    let (status, body) = call(&fake, "PUT", "/vm/snapshot", r#"{"dir":"/c","bogus":1}"#);
    assert_eq!(status, 400);
    assert!(error_text(&body).contains("unknown field"));
}

#[test]
fn migrate_streams_progress_then_the_outcome() {
    let fake = Fake::new(VmRunState::Running);
    let (status, body) = call(&fake, "PUT", "/vm/migrate", r#"{"to":"h:1"}"#);
    assert_eq!(status, 200);
    let events: Vec<MigrateEvent> = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2);
    assert!(events[0].progress.is_some());
    assert_eq!(events[1].done.as_ref().map(|d| d.rounds), Some(2));
    let (status, body) = call(&fake, "PUT", "/vm/migrate", r#"{"to":"h:1","bogus":1}"#);
    assert_eq!(status, 400);
    assert!(error_text(&body).contains("HOST:PORT"));
}

#[test]
fn exec_streams_ndjson_events() {
    let fake = Fake::new(VmRunState::Running);
    let (status, body) = call(&fake, "POST", "/exec", r#"{"argv":["echo","hi"]}"#);
    assert_eq!(status, 200);
    let events: Vec<ExecEvent> = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0].stdout.as_deref(), Some("echo hi"));
    assert_eq!(events.last().unwrap().exit_status, Some(3));
}

/// The little of OpenAPI YAML the spec test needs, read by indentation: every key's full
/// path, and the inline values (`$ref`, `required: [..]`). Block scalars (`|`) are skipped.
struct Spec {
    keys: Vec<(Vec<String>, String)>,
}

impl Spec {
    fn load() -> Spec {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut keys = Vec::new();
        let mut stack: Vec<(usize, String)> = Vec::new();
        let mut block_indent: Option<usize> = None;
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let trimmed = line.trim();
            if let Some(b) = block_indent {
                if trimmed.is_empty() || indent > b {
                    continue;
                }
                block_indent = None;
            }
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once(':') else {
                continue;
            };
            let key = key.trim_matches('\'').to_owned();
            let value = value.trim().to_owned();
            while stack.last().is_some_and(|(i, _)| *i >= indent) {
                stack.pop();
            }
            if value == "|" {
                block_indent = Some(indent);
            }
            stack.push((indent, key));
            keys.push((stack.iter().map(|(_, k)| k.clone()).collect(), value));
        }
        Spec { keys }
    }

    /// Values of keys whose path starts with `prefix` and has `len` parts.
    fn under(&self, prefix: &[&str], len: usize) -> Vec<(Vec<String>, String)> {
        self.keys
            .iter()
            .filter(|(k, _)| k.len() == len && k.iter().zip(prefix).all(|(a, b)| a == b))
            .cloned()
            .collect()
    }

    fn operations(&self) -> BTreeSet<(String, String)> {
        self.under(&["paths"], 3)
            .into_iter()
            .map(|(k, _)| (k[1].clone(), k[2].to_uppercase()))
            .collect()
    }

    /// Status → schema name (if any) of one operation's responses.
    fn responses(&self, path: &str, method: &str) -> BTreeMap<u16, Option<String>> {
        let method = method.to_lowercase();
        let base = ["paths", path, &method, "responses"];
        let mut out = BTreeMap::new();
        for (k, _) in self.under(&base, 5) {
            out.insert(k[4].parse().unwrap(), None);
        }
        for (k, v) in self.keys.iter().filter(|(k, _)| {
            k.len() > 5 && k[..4] == base && k.last().map(String::as_str) == Some("$ref")
        }) {
            let schema = v.trim_matches('\'').rsplit('/').next().unwrap().to_owned();
            out.insert(k[4].parse().unwrap(), Some(schema));
        }
        out
    }

    fn properties(&self, schema: &str) -> BTreeSet<String> {
        self.under(&["components", "schemas", schema, "properties"], 5)
            .into_iter()
            .map(|(k, _)| k[4].clone())
            .collect()
    }

    fn required(&self, schema: &str) -> BTreeSet<String> {
        self.under(&["components", "schemas", schema, "required"], 4)
            .first()
            .map(|(_, v)| {
                v.trim_matches(['[', ']'])
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks that a JSON object has only the schema's fields and all its required ones;
    /// nested objects are checked against their `$ref` schemas.
    fn check(&self, schema: &str, value: &Value) {
        let Value::Object(map) = value else {
            panic!("{schema}: not an object: {value}")
        };
        let props = self.properties(schema);
        assert!(!props.is_empty(), "schema {schema} missing from the spec");
        for (field, inner) in map {
            assert!(props.contains(field), "{schema} has no field {field}");
            let nested = self.under(
                &["components", "schemas", schema, "properties", field, "$ref"],
                6,
            );
            if let Some((_, r)) = nested.first() {
                self.check(r.trim_matches('\'').rsplit('/').next().unwrap(), inner);
            }
        }
        for field in self.required(schema) {
            assert!(map.contains_key(&field), "{schema} lacks required {field}");
        }
    }
}

#[test]
fn server_and_spec_agree() {
    let spec = Spec::load();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|(p, ms)| ms.iter().map(|m| (p.to_string(), m.to_string())))
        .collect();
    assert_eq!(
        spec.operations(),
        served,
        "paths and methods of spec and server"
    );

    let fake = Fake::new(VmRunState::Running);
    let exec_body = r#"{"argv":["echo","x"],"stdin":"eA=="}"#;
    let migrate_body = r#"{"to":"10.0.0.2:7000","downtime_ms":100}"#;
    let copy_in = r#"{"host_path":"/h","guest_path":"/g"}"#;
    let copy_out = r#"{"guest_path":"/g","host_path":"/h"}"#;
    let missing = r#"{"guest_path":"/missing","host_path":"/h"}"#;
    let freeze = r#"{"mount_points":["/data"],"timeout_secs":30}"#;
    // (method, path, body, VM state): each call's status must be in the spec for its route
    // and its body must fit the schema the spec gives for that status.
    let calls: &[(&str, &str, &str, VmRunState)] = &[
        ("GET", "/vm", "", VmRunState::Running),
        ("GET", "/health", "", VmRunState::Running),
        ("GET", "/health", "", VmRunState::Paused),
        ("POST", "/exec", exec_body, VmRunState::Running),
        ("POST", "/exec", exec_body, VmRunState::Paused),
        ("POST", "/exec", "{}", VmRunState::Running),
        ("PUT", "/vm/pause", "", VmRunState::Running),
        ("PUT", "/vm/pause", "", VmRunState::Paused),
        ("PUT", "/vm/resume", "", VmRunState::Paused),
        ("PUT", "/vm/resume", "", VmRunState::Running),
        ("PUT", "/vm/shutdown", "", VmRunState::Running),
        ("PUT", "/vm/migrate", migrate_body, VmRunState::Running),
        ("PUT", "/vm/migrate", migrate_body, VmRunState::Stopping),
        (
            "PUT",
            "/vm/migrate",
            r#"{"to":"unreachable:1"}"#,
            VmRunState::Running,
        ),
        ("PUT", "/vm/migrate", r#"{"to":5}"#, VmRunState::Running),
        (
            "PUT",
            "/vm/snapshot",
            r#"{"dir":"/c"}"#,
            VmRunState::Running,
        ),
        (
            "PUT",
            "/vm/snapshot",
            r#"{"dir":"/c"}"#,
            VmRunState::Stopping,
        ),
        ("PUT", "/vm/snapshot", r#"{"dir":"c"}"#, VmRunState::Running),
        (
            "PUT",
            "/vm/snapshot",
            r#"{"dir":"/c","incremental":true}"#,
            VmRunState::Running,
        ),
        ("PUT", "/vm/snapshot", r#"{"dir":1}"#, VmRunState::Running),
        ("PUT", "/vm/copy-in", copy_in, VmRunState::Running),
        ("PUT", "/vm/copy-in", copy_in, VmRunState::Paused),
        ("PUT", "/vm/copy-in", "{}", VmRunState::Running),
        ("PUT", "/vm/copy-out", copy_out, VmRunState::Running),
        ("PUT", "/vm/copy-out", missing, VmRunState::Running),
        ("PUT", "/vm/copy-out", copy_out, VmRunState::Paused),
        ("PUT", "/vm/copy-out", "[]", VmRunState::Running),
        ("PUT", "/vm/fs/freeze", freeze, VmRunState::Running),
        ("PUT", "/vm/fs/freeze", "", VmRunState::Running),
        ("PUT", "/vm/fs/freeze", "{\"x\":1}", VmRunState::Running),
        ("PUT", "/vm/fs/freeze", "", VmRunState::Paused),
        ("PUT", "/vm/fs/thaw", "", VmRunState::Running),
        ("PUT", "/vm/fs/thaw", "", VmRunState::Paused),
    ];
    for (method, path, body, state) in calls {
        *fake.state.lock().unwrap() = *state;
        let (status, resp) = call(&fake, method, path, body);
        let responses = spec.responses(path, method);
        let Some(schema) = responses.get(&status) else {
            panic!("{method} {path} answered {status}, not in the spec: {responses:?}")
        };
        match schema {
            None => assert!(resp.is_empty(), "{method} {path} {status}: unexpected body"),
            Some(schema) => {
                let text = String::from_utf8(resp).unwrap();
                for line in text.lines() {
                    spec.check(schema, &serde_json::from_str(line).unwrap());
                }
            }
        }
    }
    for (schema, body) in [
        ("ExecRequest", exec_body),
        ("CopyInRequest", copy_in),
        ("CopyOutRequest", copy_out),
        ("FreezeRequest", freeze),
        (
            "SnapshotRequest",
            r#"{"dir":"/c","incremental":true,"stop":true}"#,
        ),
        ("MigrateRequest", migrate_body),
    ] {
        spec.check(schema, &serde_json::from_str(body).unwrap());
    }
}
