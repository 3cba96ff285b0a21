//! Lab tests: the stock Debian cloud kernel booted by our VMM inside an emulated host (QEMU
//! TCG with nested SVM, `vhpc lab run`). They need qemu-system-x86, busybox-static and the
//! cached guest kernel and initramfs (`bash scripts/setup.sh` installs them all), and take
//! minutes, so they are `#[ignore]`d in plain `cargo test`; `scripts/test.sh` runs them with
//! `--ignored`. A missing prerequisite fails the test with the fix, never skips it silently.

use std::process::Command;

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

fn vhpc() -> String {
    std::env::var("VHPC_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vhpc").to_string())
}

/// Runs `script` with /bin/sh inside a fresh emulated host (at most 15 minutes).
fn lab(smp: u32, script: &str) -> Run {
    lab_with_timeout(smp, 900, script)
}

/// Runs `script` with /bin/sh inside a fresh emulated host, stopping it after `secs` seconds.
fn lab_with_timeout(smp: u32, secs: u32, script: &str) -> Run {
    let out = Command::new(vhpc())
        .args([
            "lab",
            "run",
            "--smp",
            &smp.to_string(),
            "--timeout",
            &secs.to_string(),
            "--",
        ])
        .arg(script)
        .output()
        .expect("run vhpc lab");
    let run = Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "--- lab script: {script}\n--- status {}\n--- stdout:\n{}\n--- stderr:\n{}",
        run.status, run.stdout, run.stderr
    );
    run
}

/// The value printed as `key=value` on its own line.
fn field<'a>(run: &'a Run, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key}= line in the output:\n{}", run.stdout))
}

fn mem_total_mib(run: &Run) -> u64 {
    let kib: u64 = field(run, "memtotal").parse().expect("MemTotal in kB");
    kib / 1024
}

/// Runs in the guest (single-quoted in the emulated host's shell, so it expands in the guest).
const GUEST_FACTS: &str = "echo cpus=$(nproc); \
     echo online=$(cat /sys/devices/system/cpu/online); \
     echo memtotal=$(sed -n \"s/^MemTotal: *\\([0-9]*\\) kB/\\1/p\" /proc/meminfo)";

#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn boots_with_one_vcpu_and_sees_its_memory() {
    let run = lab(
        2,
        &format!("vhpc run --vcpus 1 --memory 512 -- sh -c '{GUEST_FACTS}'"),
    );
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "cpus"), "1");
    let mib = mem_total_mib(&run);
    // 512 MiB less the kernel's own reservations (its image, page structures).
    assert!((400..=512).contains(&mib), "MemTotal {mib} MiB");
}

#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn hugepage_backed_prefaulted_guest() {
    // 160 pages reserved; a prefaulted 256 MiB guest takes 128 of them for as long as it runs.
    let run = lab(
        2,
        "echo 160 > /proc/sys/vm/nr_hugepages; \
         vhpc run --memory 256 --hugepages --prefault -- sh -c 'echo guest=up; sleep 8' & \
         used=0; for i in $(seq 100); do \
           free=$(sed -n 's/^HugePages_Free: *//p' /proc/meminfo); \
           if [ $((160 - free)) -ge 128 ]; then used=$((160 - free)); break; fi; sleep 0.2; \
         done; echo used=$used; wait $!; echo status=$?; \
         vhpc run --memory 255 --hugepages -- true; echo odd=$?",
    );
    assert_eq!(run.status, 0);
    assert_eq!(
        field(&run, "used"),
        "128",
        "hugepages held by the running guest"
    );
    assert_eq!(field(&run, "status"), "0");
    assert!(run.stdout.contains("guest=up"));
    assert_eq!(
        field(&run, "odd"),
        "125",
        "255 MiB is not whole 2 MiB pages"
    );
    assert!(
        run.stderr.contains("multiple of 2"),
        "clear error for odd sizes"
    );
}

#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn boots_with_two_vcpus_and_sees_both() {
    let run = lab(
        2,
        &format!("vhpc run --vcpus 2 --memory 768 -- sh -c '{GUEST_FACTS}'"),
    );
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "cpus"), "2");
    assert_eq!(field(&run, "online"), "0-1");
    let mib = mem_total_mib(&run);
    assert!((640..=768).contains(&mib), "MemTotal {mib} MiB");
}

#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn exit_status_power_off_reboot_and_panic() {
    let run = lab(
        2,
        "vhpc run -- sh -c 'echo out; echo err >&2; exit 7'; echo status7=$?; \
         vhpc run -- poweroff -f; echo poweroff=$?; \
         vhpc run -- reboot -f; echo reboot=$?; \
         vhpc run -- sh -c 'echo c > /proc/sysrq-trigger'; echo panic=$?",
    );
    assert_eq!(run.status, 0);
    assert!(
        run.stdout.lines().any(|l| l == "out"),
        "command stdout relayed"
    );
    assert!(
        run.stderr.lines().any(|l| l == "err"),
        "command stderr relayed"
    );
    assert_eq!(field(&run, "status7"), "7");
    assert_eq!(field(&run, "poweroff"), "0");
    assert_eq!(field(&run, "reboot"), "0");
    assert_eq!(field(&run, "panic"), "123");
    assert!(
        run.stderr
            .contains("the guest kernel panicked; console log: /tmp/vhpc-console-"),
        "the panic names the kept log"
    );
    assert!(
        run.stderr.contains("Kernel panic - not syncing"),
        "log tail shown"
    );
}

#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn twenty_boots_in_a_row() {
    // Each boot is bounded by its own --timeout; 20 of them may take long on a busy machine.
    let run = lab_with_timeout(
        2,
        2700,
        "ok=0; t0=$(date +%s); for i in $(seq 20); do \
           out=$(vhpc run --timeout 120 -- echo boot$i); st=$?; \
           [ $st = 0 ] && [ \"$out\" = boot$i ] && ok=$((ok+1)); \
           echo \"boot $i: status $st, output '$out', $(( $(date +%s) - t0 )) s\"; \
         done; echo ok=$ok",
    );
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "ok"), "20");
}

#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn lab_relays_status_of_the_host_command() {
    let run = lab(1, "echo in-host; exit 3");
    assert_eq!(run.status, 3);
    assert!(run.stdout.contains("in-host"));
}

/// virtio-blk end to end, in one emulated host: boot 1 writes 1 MiB of random data to a
/// read-write disk (vda) and syncs, sees a second, read-only disk as vdb and fails to write
/// it; boot 2 reads vda back with the same checksum; the host reads the same bytes from the
/// image file.
#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn disks_keep_data_across_boots_and_read_only_refuses_writes() {
    let run = lab(
        2,
        r#"set -e
truncate -s 16M /tmp/a.img; truncate -s 8M /tmp/b.img
printf 'untouched' | dd of=/tmp/b.img conv=notrunc 2>/dev/null
vhpc run --disk /tmp/a.img --disk /tmp/b.img,ro -- sh -c '
  dd if=/dev/urandom of=/tmp/p bs=4096 count=256 2>/dev/null
  echo sum1=$(md5sum < /tmp/p | cut -d" " -f1)
  dd if=/tmp/p of=/dev/vda bs=4096 count=256 2>/dev/null; sync
  echo sizes=$(cat /sys/block/vda/size),$(cat /sys/block/vdb/size)
  echo vdb_ro=$(cat /sys/block/vdb/ro)
  if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then echo ro_write=accepted; else echo ro_write=refused; fi
  echo vdb_head=$(head -c 9 /dev/vdb)'
vhpc run --disk /tmp/a.img -- sh -c 'echo sum2=$(dd if=/dev/vda bs=4096 count=256 2>/dev/null | md5sum | cut -d" " -f1)'
echo sum_host=$(dd if=/tmp/a.img bs=4096 count=256 2>/dev/null | md5sum | cut -d" " -f1)
echo b_host=$(head -c 9 /tmp/b.img)"#,
    );
    assert_eq!(run.status, 0);
    let sum = field(&run, "sum1");
    assert_eq!(sum.len(), 32, "an md5 sum: {sum}");
    assert_eq!(field(&run, "sum2"), sum, "read back in the next boot");
    assert_eq!(field(&run, "sum_host"), sum, "the image file holds it");
    assert_eq!(field(&run, "sizes"), "32768,16384");
    assert_eq!(field(&run, "vdb_ro"), "1");
    assert_eq!(field(&run, "ro_write"), "refused");
    assert_eq!(field(&run, "vdb_head"), "untouched");
    assert_eq!(field(&run, "b_host"), "untouched");
}

/// Data the guest wrote and synced is in the image when the VMM is killed (SIGKILL) right
/// after: the guest's flush completes only after fdatasync on the image.
#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn data_a_guest_synced_survives_killing_the_vmm() {
    let run = lab(
        2,
        r#"truncate -s 16M /tmp/k.img
vhpc run --disk /tmp/k.img -- sh -c 'printf synced-before-kill | dd of=/dev/vda conv=fsync 2>/dev/null; sync; echo MARK; sleep 600' > /tmp/out 2>&1 &
pid=$!
i=0; while ! grep -q MARK /tmp/out && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
kill -9 $pid; wait $pid; echo killed=$?
echo vmm_output=$(tr '\n' '|' < /tmp/out)
echo image=$(head -c 18 /tmp/k.img)"#,
    );
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "killed"), "137", "the VMM died of SIGKILL");
    assert_eq!(field(&run, "image"), "synced-before-kill");
}

/// Guest loop for the pause test: a counter in /tmp/c, one step per 0.1 s, and the guest's
/// uptime at every step appended to /tmp/t.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; \
     cut -d\" \" -f1 /proc/uptime >> /tmp/t; sleep 0.1; done > /dev/null 2>&1 &";

#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn long_running_vm_exec_pause_resume_stop() {
    let script = format!(
        "t() {{ cut -d' ' -f1 /proc/uptime; }}; \
         secs() {{ awk \"BEGIN{{print $(t)-$1}}\"; }}; \
         t0=$(t); vhpc vm start a --memory 512; echo start=$?; echo start_secs=$(secs $t0); \
         vhpc vm start a; echo dup=$?; vhpc vm start a/b; echo badname=$?; \
         t0=$(t); ok=0; for N in $(seq 100); do \
           out=$(vhpc exec a -- sh -c \"echo $N; exit $(($N % 7))\"); st=$?; \
           [ \"$out\" = \"$N\" ] && [ $st -eq $(($N % 7)) ] && ok=$((ok+1)); \
         done; echo exec_ok=$ok; echo exec100_secs=$(secs $t0); \
         vhpc exec a -- sh -c 'echo to-err >&2; exit 3'; echo errstatus=$?; \
         echo hello | vhpc exec a --stdin -- cat; \
         vhpc vm list | sed 's/^/list: /'; \
         vhpc exec a -- sh -c '{COUNTER}'; sleep 2; \
         c0=$(vhpc exec a -- cat /tmp/c); vhpc vm pause a; echo pause=$?; \
         vhpc vm list | grep '^a ' | sed 's/^/paused: /'; \
         vhpc exec a -- true; echo exec_paused=$?; sleep 3; \
         vhpc vm resume a; echo resume=$?; c1=$(vhpc exec a -- cat /tmp/c); \
         sleep 3; c2=$(vhpc exec a -- cat /tmp/c); \
         echo paused_delta=$((c1-c0)); echo running_delta=$((c2-c1)); \
         echo max_gap=$(vhpc exec a -- awk 'NR>1 && $1-p>g {{g=$1-p}} {{p=$1}} END {{print g+0}}' /tmp/t); \
         printf 'BOGUS\\r\\n\\r\\n' | vhpc vm api a --raw | head -1 | sed 's/^/raw: /'; \
         vhpc vm api a POST /exec '{{\"argv\": 5}}'; r=$?; echo; echo badjson=$r; \
         vhpc vm api a GET /nope; echo; \
         vhpc exec a -- echo still-alive; \
         vhpc vm api a GET /health | sed 's/^/health: /'; echo; \
         t0=$(t); vhpc vm stop a; echo stop=$?; echo stop_secs=$(secs $t0); \
         echo after_stop=$(vhpc vm list | grep -c '^a '); echo dirs=$(ls /run/vhpc | wc -l)"
    );
    let run = lab(2, &script);
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "start"), "0");
    assert_eq!(field(&run, "dup"), "125");
    assert!(
        run.stderr.contains("already running"),
        "duplicate name refused"
    );
    assert_eq!(field(&run, "badname"), "125");
    assert!(run.stderr.contains("invalid VM name"));
    assert_eq!(field(&run, "exec_ok"), "100");
    assert_eq!(field(&run, "errstatus"), "3");
    assert!(run.stderr.lines().any(|l| l == "to-err"), "stderr relayed");
    assert!(run.stdout.lines().any(|l| l == "hello"), "stdin relayed");
    let listed = run
        .stdout
        .lines()
        .find(|l| l.starts_with("list: a "))
        .expect("a in vm list");
    let cols: Vec<&str> = listed.split_whitespace().collect();
    assert_eq!(&cols[1..5], &["a", "running", "1", "512MiB"], "{listed}");
    assert_eq!(field(&run, "pause"), "0");
    assert!(run.stdout.contains("paused: a "), "paused in the list");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("paused: a") && l.contains(" paused ")),
        "list shows the paused state"
    );
    assert_eq!(field(&run, "exec_paused"), "125");
    assert!(run.stderr.contains("is paused; resume it first"));
    assert_eq!(field(&run, "resume"), "0");
    let paused: i64 = field(&run, "paused_delta").parse().expect("counter");
    let running: i64 = field(&run, "running_delta").parse().expect("counter");
    // Paused for 3 s: the counter may take one step when its sleep expires at resume, plus
    // the steps during the exec and pause/resume commands around the pause (~0.35 s each in
    // the lab); running for 3 s it takes many more. The guest's own timeline shows the pause
    // as one gap of at least 3 s between two steps (its clock runs on while paused, no step
    // happened in between), longer than any gap while running.
    assert!(
        paused * 2 < running,
        "counter advanced {paused} steps across a 3 s pause, {running} in 3 s running"
    );
    let gap: f64 = field(&run, "max_gap").parse().expect("seconds");
    assert!(
        gap >= 2.9,
        "no 3 s gap in the guest's counter timeline (largest {gap} s)"
    );
    assert!(run.stdout.contains("raw: HTTP/1.1 400 Bad Request"));
    assert!(run.stdout.contains("invalid exec request body"));
    assert_eq!(field(&run, "badjson"), "1");
    assert!(run.stdout.contains("no such path /nope"));
    assert!(
        run.stdout.lines().any(|l| l == "still-alive"),
        "the VM survived bad input"
    );
    assert!(run.stdout.contains("\"mem_total_kib\""), "health answered");
    assert_eq!(field(&run, "stop"), "0");
    assert_eq!(field(&run, "after_stop"), "0");
    assert_eq!(field(&run, "dirs"), "0");
}

/// File copy through the agent on vsock: a 10 MiB random file in and back out with the same
/// sha256 and permission bits; a missing guest file and a missing guest directory are clear
/// errors. (Every request goes through the VM's vsock socket with `CONNECT 1024`.)
#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn copies_a_10_mib_file_in_and_out_over_vsock() {
    let run = lab(
        2,
        r#"t() { cut -d' ' -f1 /proc/uptime; }
secs() { awk "BEGIN{print $(t)-$1}"; }
vhpc vm start c --memory 512; echo start=$?
ls -l /run/vhpc/c/vsock.sock | cut -c1 | sed 's/^/sock_type=/'
dd if=/dev/urandom of=/tmp/in.bin bs=1048576 count=10 2>/dev/null; chmod 751 /tmp/in.bin
echo sum_in=$(sha256sum < /tmp/in.bin | cut -d' ' -f1)
t0=$(t); vhpc cp /tmp/in.bin c:/tmp/copied.bin; echo cp_in=$?; echo cp_in_secs=$(secs $t0)
vhpc exec c -- sh -c 'echo sum_guest=$(sha256sum < /tmp/copied.bin | cut -d" " -f1); echo mode_guest=$(stat -c %a /tmp/copied.bin); ls -a /tmp | grep -c vhpc-copy | sed "s/^/leftover_guest=/"'
mkdir /tmp/out; t0=$(t); vhpc cp c:/tmp/copied.bin /tmp/out; echo cp_out=$?; echo cp_out_secs=$(secs $t0)
echo sum_out=$(sha256sum < /tmp/out/copied.bin | cut -d' ' -f1); echo mode_out=$(stat -c %a /tmp/out/copied.bin)
vhpc cp c:/no/such/file /tmp/x; echo missing=$?
vhpc cp /tmp/in.bin c:/no/such/dir/f; echo nodir=$?
vhpc cp /tmp/in.bin /tmp/y; echo no_vm=$?
vhpc exec c -- echo still-alive
vhpc vm stop c; echo stop=$?"#,
    );
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "start"), "0");
    assert_eq!(field(&run, "sock_type"), "s", "NAME/vsock.sock is a socket");
    let sum = field(&run, "sum_in");
    assert_eq!(sum.len(), 64, "a sha256: {sum}");
    assert_eq!(field(&run, "cp_in"), "0");
    assert_eq!(
        field(&run, "sum_guest"),
        sum,
        "the guest has the same bytes"
    );
    assert_eq!(
        field(&run, "mode_guest"),
        "751",
        "mode bits kept on the way in"
    );
    assert_eq!(field(&run, "leftover_guest"), "0", "no temporary file left");
    assert_eq!(field(&run, "cp_out"), "0");
    assert_eq!(field(&run, "sum_out"), sum, "the same bytes came back");
    assert_eq!(
        field(&run, "mode_out"),
        "751",
        "mode bits kept on the way out"
    );
    assert_eq!(field(&run, "missing"), "125");
    assert!(
        run.stderr
            .contains("in the guest: cannot open /no/such/file in the guest"),
        "missing guest file reported"
    );
    assert_eq!(field(&run, "nodir"), "125");
    assert!(
        run.stderr
            .contains("cannot create /no/such/dir/f in the guest")
    );
    assert_eq!(field(&run, "no_vm"), "125");
    assert!(run.stderr.contains("neither side names a VM"));
    assert!(run.stdout.lines().any(|l| l == "still-alive"));
    assert_eq!(field(&run, "stop"), "0");
}

/// Freeze and thaw of a guest ext4 file system on a virtio disk: a write started during the
/// freeze blocks until the thaw; a freeze the host does not end thaws by itself after its
/// timeout; an unfreezable mount point is a clear error. busybox has no mkfs.ext4: the disk
/// gets an ext2 file system (busybox mke2fs) mounted with the ext4 driver (`-t ext4`).
#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn freeze_blocks_guest_writes_until_thaw() {
    let run = lab(
        2,
        r#"truncate -s 64M /tmp/f.img
vhpc vm start f --memory 512 --disk /tmp/f.img; echo start=$?
vhpc exec f -- sh -c 'mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && grep " /mnt " /proc/mounts | cut -d" " -f3 | sed "s/^/fstype=/"'
WRITER='(cut -d" " -f1 /proc/uptime > /tmp/t0; echo written-$1 > /mnt/file; cut -d" " -f1 /proc/uptime > /tmp/t1) > /dev/null 2>&1 &'
STATE='if [ -e /tmp/t1 ]; then echo written; else echo blocked; fi'
vhpc vm freeze f /mnt | sed 's/^/frozen=/'
vhpc exec f -- sh -c "rm -f /tmp/t1; $WRITER" sh one
sleep 4; echo during_freeze=$(vhpc exec f -- sh -c "$STATE")
vhpc vm thaw f | sed 's/^/thawed=/'
sleep 1; echo after_thaw=$(vhpc exec f -- sh -c "$STATE")
echo content=$(vhpc exec f -- cat /mnt/file)
echo blocked_secs=$(vhpc exec f -- awk '{print $1}' /tmp/t0 /tmp/t1 | awk 'NR==1{a=$1} NR==2{print $1-a}')
vhpc vm freeze f --timeout 6 | sed 's/^/frozen_all=/'
vhpc exec f -- sh -c "rm -f /tmp/t1; $WRITER" sh two
sleep 1; echo before_timeout=$(vhpc exec f -- sh -c "$STATE")
sleep 8; echo after_timeout=$(vhpc exec f -- sh -c "$STATE")
echo content2=$(vhpc exec f -- cat /mnt/file)
echo blocked_secs2=$(vhpc exec f -- awk '{print $1}' /tmp/t0 /tmp/t1 | awk 'NR==1{a=$1} NR==2{print $1-a}')
vhpc vm thaw f | wc -l | sed 's/^/thawed_after_timeout=/'
vhpc vm freeze f /nonexistent; echo bad_freeze=$?
vhpc vm api f PUT /vm/fs/freeze '{"mount_points": ["rel"]}'; r=$?; echo; echo bad_body=$r
vhpc vm stop f; echo stop=$?"#,
    );
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "start"), "0");
    assert_eq!(field(&run, "fstype"), "ext4");
    assert_eq!(field(&run, "frozen"), "/mnt");
    assert_eq!(field(&run, "during_freeze"), "blocked", "the write waits");
    assert_eq!(field(&run, "thawed"), "/mnt");
    assert_eq!(field(&run, "after_thaw"), "written", "the thaw released it");
    assert_eq!(field(&run, "content"), "written-one");
    let blocked: f64 = field(&run, "blocked_secs").parse().expect("seconds");
    assert!(
        blocked >= 3.5,
        "the write was blocked {blocked} s, not ~4 s"
    );
    assert_eq!(
        field(&run, "frozen_all"),
        "/mnt",
        "freeze-all finds the disk"
    );
    assert_eq!(field(&run, "before_timeout"), "blocked");
    assert_eq!(
        field(&run, "after_timeout"),
        "written",
        "auto-thaw after 3 s"
    );
    assert_eq!(field(&run, "content2"), "written-two");
    assert_eq!(
        field(&run, "thawed_after_timeout"),
        "0",
        "nothing left frozen"
    );
    assert_eq!(field(&run, "bad_freeze"), "125");
    assert!(run.stderr.contains("cannot freeze /nonexistent"));
    assert!(run.stdout.contains("is not an absolute path"));
    assert_eq!(field(&run, "bad_body"), "1", "a 4xx answer");
    assert_eq!(field(&run, "stop"), "0");
}

/// A host program talks to a guest service through the VM's vsock socket (`vhpc vm connect`
/// writes `CONNECT <port>`): the guest runs vhpc's echo service on vsock port 5000 (the
/// guest's /init is the vhpc binary); a line and 2 MiB of random bytes come back unchanged
/// (credit flow control both ways); a port nobody listens on is refused clearly.
#[test]
#[ignore = "lab test: boots emulated hosts; run by scripts/test.sh"]
fn host_programs_reach_guest_vsock_services_with_connect() {
    let run = lab(
        2,
        r#"vhpc vm start e --memory 512; echo start=$?
vhpc exec e -- sh -c '/init vsock-echo 5000 > /dev/null 2>&1 &'
sleep 1
echo echoed=$(echo hello-over-vsock | vhpc vm connect e 5000)
dd if=/dev/urandom of=/tmp/r bs=1048576 count=2 2>/dev/null
echo sum_sent=$(sha256sum < /tmp/r | cut -d' ' -f1)
echo sum_back=$(vhpc vm connect e 5000 < /tmp/r | sha256sum | cut -d' ' -f1)
vhpc vm connect e 5001 < /dev/null; echo refused=$?
vhpc exec e -- echo still-alive
vhpc vm stop e; echo stop=$?"#,
    );
    assert_eq!(run.status, 0);
    assert_eq!(field(&run, "start"), "0");
    assert_eq!(field(&run, "echoed"), "hello-over-vsock");
    let sum = field(&run, "sum_sent");
    assert_eq!(sum.len(), 64, "a sha256: {sum}");
    assert_eq!(field(&run, "sum_back"), sum, "2 MiB echoed unchanged");
    assert_eq!(field(&run, "refused"), "125");
    assert!(
        run.stderr
            .contains("nothing listens on guest vsock port 5001")
    );
    assert!(run.stdout.lines().any(|l| l == "still-alive"));
    assert_eq!(field(&run, "stop"), "0");
}
