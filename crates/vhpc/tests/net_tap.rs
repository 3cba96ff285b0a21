//! The host side of `--net` on this machine's own /dev/kvm, with vhpc's freestanding test
//! guest (it has no network driver: these tests are about the TAP, not the guest). They need
//! root (CAP_NET_ADMIN), /dev/net/tun and the bridge module, and `unshare` and `ip`
//! (util-linux, iproute2) so that everything happens in a network namespace of their own;
//! anything missing fails the test with what to install.

use std::process::Command;

use vhpc_vmm::host::{self, KvmKind};

fn guest() -> String {
    assert_ne!(
        host::kvm_kind(),
        KvmKind::Missing,
        "this test needs /dev/kvm (hardware or kvm_pvm); none is accessible on this machine"
    );
    vhpc_testguest::elf_path()
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

/// Runs `script` with sh in a new network namespace; returns (status, stdout, stderr).
fn in_netns(script: &str) -> (i32, String, String) {
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", script])
        .env("VHPC", env!("CARGO_BIN_EXE_vhpc"))
        .env("GUEST", guest())
        .output()
        .expect("this test needs `unshare` (util-linux)");
    let r = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!(
        "--- script: {script}\n--- status {}\n--- stdout:\n{}\n--- stderr:\n{}",
        r.0, r.1, r.2
    );
    assert!(
        !r.2.contains("unshare failed") && !r.2.contains("Operation not permitted"),
        "this test needs root (CAP_SYS_ADMIN for a network namespace, CAP_NET_ADMIN for TAPs)"
    );
    r
}

#[test]
fn a_bridge_tap_exists_while_the_vm_runs_and_goes_with_it() {
    // The test guest halts for good; --timeout ends the VM (status 124) after 4 s, while the
    // shell looks at the bridge.
    let (status, stdout, _) = in_netns(
        r#"ip link add br0 type bridge && ip link set br0 up || exit 99
"$VHPC" run --kernel "$GUEST" --cmdline halt --timeout 4 \
    --net bridge=br0,mac=52:54:00:00:00:42 --net tap=t1 -- true &
i=0; until ip -o link show master br0 | grep -q vhpc-; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.05; done
echo during=$(ip -o link show master br0 | grep -o 'vhpc-[0-9]*-0' | sed 's/[0-9]\+/PID/')
echo t1_during=$(ip -o link show t1 | grep -c 'UP')
wait $!; echo status=$?
echo after=$(ip -o link show master br0 | wc -l)
echo t1_after=$(ip -o link show 2>/dev/null | grep -c ' t1:')"#,
    );
    assert_eq!(status, 0);
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {stdout}"))
            .to_string()
    };
    assert_eq!(
        field("during"),
        "vhpc-PID-0",
        "a TAP on the bridge while it runs"
    );
    assert_eq!(field("t1_during"), "1", "a created tap= TAP is up");
    assert_eq!(field("status"), "124", "ended by --timeout");
    assert_eq!(field("after"), "0", "the bridge port is gone with the VM");
    assert_eq!(
        field("t1_after"),
        "0",
        "the created TAP is gone with the VM"
    );
}

#[test]
fn a_missing_bridge_or_a_non_bridge_is_a_clear_error() {
    let (status, stdout, stderr) = in_netns(
        r#""$VHPC" run --kernel "$GUEST" --net bridge=nosuchbr -- true; echo missing=$?
ip tuntap add notabr mode tap
"$VHPC" run --kernel "$GUEST" --net bridge=notabr -- true; echo notabr=$?
echo links=$(ip -o link show | wc -l)"#,
    );
    assert_eq!(status, 0);
    assert!(stdout.contains("missing=125"), "{stdout}");
    assert!(
        stderr.contains("bridge nosuchbr does not exist; create it first"),
        "{stderr}"
    );
    assert!(stdout.contains("notabr=125"), "{stdout}");
    assert!(stderr.contains("notabr is not a bridge"), "{stderr}");
    // lo and notabr: no TAP left behind by the failed attempts.
    assert!(stdout.contains("links=2"), "{stdout}");
}
