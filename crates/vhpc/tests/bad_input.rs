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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhpc"));
    cmd.arg("run")
        .args(args)
        .args(["--timeout", "20", "--", "true"]);
    at_once(&mut cmd)
}

/// Runs `cmd`; returns its status and stderr, checking it ends quickly and did not panic.
fn at_once(cmd: &mut Command) -> (i32, String) {
    let start = Instant::now();
    let out = cmd.output().expect("run vhpc");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "bad input must fail at once"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{cmd:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "vhpc panicked: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_one_line_error(args: &[&str], expected: &str) {
    let (status, stderr) = vhpc_run(args);
    check_one_line_error(status, &stderr, expected);
}

/// vhpc's exit status for an error, and one `vhpc: error:` line that contains `expected`.
fn check_one_line_error(status: i32, stderr: &str, expected: &str) {
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
fn rootfs_that_is_missing_or_not_ext4() {
    let kernel = temp_file(b"x");
    let k = kernel.path().to_str().expect("utf-8 path");
    let common = ["--kernel", k, "--initrd", "/dev/null"];
    let with = |extra: &[&str]| -> Vec<String> {
        common
            .iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let args = with(&["--rootfs", "/nonexistent/r.img"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_one_line_error(&args, "does not exist; build one with `vhpc image rootfs");
    let not_ext4 = temp_file(&[0u8; 8192]);
    let args = with(&["--rootfs", not_ext4.path().to_str().expect("utf-8 path")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_one_line_error(&args, "is not an ext4 file system image");
    let (status, stderr) = vhpc_run(&["--rootfs", "x.img,rw"]);
    assert_ne!(status, 0);
    assert!(stderr.contains("unknown --disk option \"rw\""), "{stderr}");
}

/// `vhpc image rootfs` checks its arguments before it starts any build.
#[test]
fn image_rootfs_arguments_are_checked_first() {
    let image_rootfs = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vhpc"))
            .args(["image", "rootfs"])
            .args(args)
            .env("VHPC_CACHE_DIR", "/nonexistent/vhpc-cache")
            .output()
            .expect("run vhpc");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("vhpc image rootfs {args:?}: {stderr}");
        (out.status.code().unwrap_or(-1), stderr)
    };
    for (args, expected) in [
        (
            &["--packages", "openmpi-bin,Bad_Name"][..],
            "invalid package name \"Bad_Name\"",
        ),
        (&["--size", "0.01"], "invalid --size 0.01"),
        (&["--size", "lots"], "invalid value 'lots'"),
        (&["--mirror", "deb.debian.org"], "invalid --mirror"),
    ] {
        let (status, stderr) = image_rootfs(args);
        assert_ne!(status, 0, "{args:?}");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in {stderr}"
        );
    }
    let existing = temp_file(b"an image already");
    let (status, stderr) = image_rootfs(&[existing.path().to_str().expect("utf-8 path")]);
    assert_eq!(status, VHPC_ERROR);
    assert!(
        stderr.contains("already exists; remove it or pass --force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(existing.path()).expect("read"),
        b"an image already",
        "the existing file is untouched"
    );
}

/// `vhpc lab` refuses bad input before it boots anything.
#[test]
fn lab_arguments_are_checked_before_booting() {
    let vhpc = |args: &[&str]| {
        let start = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_vhpc"))
            .args(args)
            .output()
            .expect("run vhpc");
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{args:?} must fail at once"
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("vhpc {args:?}: {stderr}");
        (out.status.code().unwrap_or(-1), stderr)
    };
    let (status, stderr) = vhpc(&["lab", "on", "0", "--", "true"]);
    assert_eq!(status, VHPC_ERROR);
    assert!(
        stderr.contains("no lab host 0: hosts are numbered 1 to 8"),
        "{stderr}"
    );
    assert!(
        Path::new("/usr/bin/qemu-system-x86_64").exists(),
        "this test needs qemu-system-x86_64 (apt-get install qemu-system-x86, or run \
         scripts/setup.sh)"
    );
    let (status, stderr) = vhpc(&["lab", "run", "--disk", "/nonexistent/r.img", "--", "true"]);
    assert_eq!(status, VHPC_ERROR);
    assert!(
        stderr.contains("the disk image /nonexistent/r.img is missing"),
        "{stderr}"
    );
    let (status, stderr) = vhpc(&["lab", "run", "--hosts", "9", "--", "true"]);
    assert_eq!(status, VHPC_ERROR);
    assert!(
        stderr.contains("--hosts 9: a lab has 1 to 8 hosts"),
        "{stderr}"
    );
}

/// Bad `--net` specs are refused by the argument parser with what to fix.
#[test]
fn bad_net_specs_say_what_to_fix() {
    for (spec, expected) in [
        ("tap=t0,bridge=br0", "not both"),
        ("vlan=3", "the options are tap=NAME, bridge=BR and mac=MAC"),
        ("tap=t0,mac=52:54:00:12:34", "is not a MAC address"),
        ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
        ("bridge=a-name-far-too-long", "1 to 15 characters"),
        ("mac=52:54:00:12:34:56", "needs tap=NAME or bridge=BR"),
    ] {
        let (status, stderr) = vhpc_run(&["--net", spec]);
        assert_ne!(status, 0, "{spec}");
        assert!(stderr.contains(expected), "--net {spec}: {stderr}");
    }
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

/// A VM whose VMM died without being asked keeps its state directory; `vhpc vm stop` removes
/// it, and shows the ends of its logs first, so the reason it died is not lost with them.
#[test]
fn stopping_a_dead_vm_shows_why_it_died() {
    let runtime = tempfile::tempdir().expect("temp dir");
    let vm = runtime.path().join("dead");
    std::fs::create_dir(&vm).expect("state dir");
    std::fs::write(vm.join("pid"), "4242\n").expect("pid file, not locked: dead");
    std::fs::write(
        vm.join("vmm.log"),
        "vcpu0 crashed: triple fault at rip 0xfeed\n",
    )
    .expect("vmm.log");
    std::fs::write(vm.join("console.log"), "last words of the guest\n").expect("console.log");
    let out = Command::new(env!("CARGO_BIN_EXE_vhpc"))
        .args(["vm", "stop", "dead"])
        .env("VHPC_RUNTIME_DIR", runtime.path())
        .output()
        .expect("run vhpc vm stop");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ended unexpectedly"), "{stderr}");
    assert!(stderr.contains("triple fault at rip 0xfeed"), "{stderr}");
    assert!(stderr.contains("last words of the guest"), "{stderr}");
    assert!(!vm.exists(), "the state directory is removed");
}

/// `vhpc vm start` checks the VM's shape and its `--append` arguments before it creates a
/// state directory or a VMM process: one line, status 125, at once, and no VM is left.
#[test]
fn vm_start_refuses_bad_input_before_starting_anything() {
    require_kvm();
    let runtime = tempfile::tempdir().expect("temp dir");
    let kernel = temp_file(b"x");
    let k = kernel.path().to_str().expect("utf-8 path");
    let refused = |extra: &[&str], expected: &str| {
        let (status, stderr) = at_once(
            Command::new(env!("CARGO_BIN_EXE_vhpc"))
                .args(["vm", "start", "bad", "--kernel", k, "--initrd", "/dev/null"])
                .args(extra)
                .env("VHPC_RUNTIME_DIR", runtime.path()),
        );
        check_one_line_error(status, &stderr, expected);
        assert!(
            !runtime.path().join("bad").exists(),
            "no state directory is left behind"
        );
    };
    refused(&["--vcpus", "0"], "at least 1 vCPU");
    refused(&["--memory", "100000000"], "this host has only");
    refused(&["--append", "a\nb"], "control characters");
    refused(&["--append", "loglevel=7 -- x"], "guest's init");
}
