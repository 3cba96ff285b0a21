//! Bad input to `vhpc run` gets a one-line clear error and exit status 125, at once: no hang,
//! no panic. These run on the host directly (no lab): every check fires before a guest runs.
//! Checks past the argument parsing need /dev/kvm (the limits come from KVM); the test says so
//! if it is missing.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const VHPC_ERROR: i32 = 125;

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (vhpc reads the vCPU limit from KVM); none on this machine"
    );
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write temp file");
    f
}

/// Runs `vhpc run ARGS -- true`; returns its status and stderr, checking it ends quickly.
fn vhpc_run(args: &[&str]) -> (i32, String) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vhpc"))
        .arg("run")
        .args(args)
        .args(["--timeout", "20", "--", "true"])
        .output()
        .expect("run vhpc");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "bad input must fail at once"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("vhpc run {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "vhpc panicked: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_one_line_error(args: &[&str], expected: &str) {
    let (status, stderr) = vhpc_run(args);
    assert_eq!(status, VHPC_ERROR, "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("vhpc: error: "), "{stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in {stderr:?}"
    );
}

#[test]
fn missing_kernel() {
    assert_one_line_error(
        &["--kernel", "/nonexistent/vmlinuz", "--initrd", "/dev/null"],
        "kernel /nonexistent/vmlinuz does not exist",
    );
}

#[test]
fn kernel_that_is_a_directory() {
    assert_one_line_error(
        &["--kernel", "/tmp", "--initrd", "/dev/null"],
        "kernel /tmp is a directory, not a file",
    );
}

#[test]
fn missing_initramfs() {
    let kernel = temp_file(b"x");
    let k = kernel.path().to_str().expect("utf-8 path");
    assert_one_line_error(
        &["--kernel", k, "--initrd", "/nonexistent/initrd"],
        "initramfs /nonexistent/initrd does not exist",
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    require_kvm();
    let kernel = temp_file(b"#!/bin/sh\necho I am a script\n");
    let k = kernel.path().to_str().expect("utf-8 path");
    assert_one_line_error(
        &["--kernel", k, "--initrd", "/dev/null"],
        "is not a Linux kernel",
    );
}

#[test]
fn vcpu_and_memory_limits() {
    require_kvm();
    let kernel = temp_file(b"x");
    let k = kernel.path().to_str().expect("utf-8 path");
    let common = ["--kernel", k, "--initrd", "/dev/null"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        common
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect()
    };
    assert_one_line_error(&with(&["--vcpus", "0"]), "at least 1 vCPU");
    assert_one_line_error(&with(&["--vcpus", "100000"]), "allows at most");
    assert_one_line_error(&with(&["--memory", "0"]), "at least 16 MiB");
    assert_one_line_error(&with(&["--memory", "100000000"]), "this host has only");
}

#[test]
fn malformed_numbers_are_rejected_by_the_parser() {
    let (status, stderr) = vhpc_run(&["--vcpus", "two"]);
    assert_ne!(status, 0);
    assert!(stderr.contains("invalid value 'two'"), "{stderr}");
}

#[test]
fn bad_vsock_options() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("v.sock");
    let sock = sock.to_str().expect("utf-8 path");
    assert_one_line_error(
        &["--vsock", sock, "--vsock-cid", "2"],
        "guest CID 2 is reserved",
    );
    let long = format!("/{}", "x".repeat(120));
    assert_one_line_error(&["--vsock", &long], "too long for a Unix socket");
    // A regular file where the socket should go is not replaced.
    let file = temp_file(b"keep me");
    let path = file.path().to_str().expect("utf-8 path");
    require_kvm();
    let guest = dir.path().join("g.elf");
    std::fs::write(&guest, vhpc_testguest_elf()).expect("write the test guest");
    assert_one_line_error(
        &["--kernel", guest.to_str().expect("utf-8"), "--vsock", path],
        "exists and is not a socket",
    );
    assert_eq!(std::fs::read(file.path()).expect("read"), b"keep me");
}

/// vhpc's own freestanding test guest (`vhpc image test-guest`).
fn vhpc_testguest_elf() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("g.elf");
    let status = Command::new(env!("CARGO_BIN_EXE_vhpc"))
        .args(["image", "test-guest", "--out"])
        .arg(&out)
        .status()
        .expect("run vhpc image test-guest");
    assert!(status.success());
    std::fs::read(&out).expect("read the test guest")
}
