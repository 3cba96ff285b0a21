//! Direct tests of live migration (crates/vmm/src/migration) between two VMs in one process,
//! with vhpc's test guest on this machine's /dev/kvm: a guest counting and checksumming its
//! memory continues exactly on the destination; a stream that breaks, a destination that
//! refuses or gives up, leave the source running and consistent; garbage never panics the
//! receiver.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{WAIT, config, console, counter, io, wait_for_count};
use vhpc_api::HostLimits;
use vhpc_vmm::migration::wire::{self, Kind};
use vhpc_vmm::migration::{
    self, MigrationError, MigrationOptions, Phase, Progress, ReceiveOptions,
};
use vhpc_vmm::{Vm, VmOutcome};

/// Receives in a thread; the thread runs the VM to its end and returns (outcome, console).
fn spawn_receiver(
    mut stream: UnixStream,
    opts: ReceiveOptions,
) -> std::thread::JoinHandle<Result<(VmOutcome, String), MigrationError>> {
    std::thread::spawn(move || {
        let vm = migration::receive(&mut stream, io(), &opts, &mut |_| {})?.vm;
        let outcome = vm.wait(Some(WAIT));
        Ok((outcome, console(&vm)))
    })
}

fn assert_finishes_exactly(outcome: VmOutcome, console: &str, n: u64) {
    assert_eq!(outcome, VmOutcome::Exit(0), "{console}");
    let expected = vhpc_testguest::expected_count_line(n);
    assert!(console.contains(&expected), "{expected} in:\n{console}");
}

#[test]
fn a_running_guest_migrates_and_continues_exactly() {
    let n = 400_000;
    let config = config(2, 64, &format!("smp=2 dirty=16 count={n}"));
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, n / 20);
    let (mut here, there) = UnixStream::pair().unwrap();
    let receiver = spawn_receiver(there, ReceiveOptions::default());
    let mut reports: Vec<Progress> = Vec::new();
    let opts = MigrationOptions {
        downtime: Duration::from_millis(50),
        ..Default::default()
    };
    let stats = migration::migrate(&vm, &mut here, &opts, &mut |p| reports.push(*p)).unwrap();
    eprintln!("{stats:?}");
    assert!(
        vm.is_paused(),
        "the source stays stopped after the handover"
    );
    let left_at = counter(&vm);
    assert!(left_at < n, "migrated mid-count ({left_at} of {n})");
    // The dirty area (16 MiB, 4096 pages) and the guest's code and data were all sent.
    assert!(stats.pages_sent >= 4096, "{stats:?}");
    assert!(stats.rounds >= 1 && stats.downtime <= stats.total);
    assert_eq!(reports.last().map(|p| p.phase), Some(Phase::Done));
    assert!(reports.iter().any(|p| p.phase == Phase::StopAndCopy));
    drop(vm);
    let (outcome, console) = receiver.join().unwrap().unwrap();
    assert_finishes_exactly(outcome, &console, n);
    assert!(
        !console.contains(vhpc_testguest::FIRST_LINE),
        "no reboot on the destination"
    );
}

/// A stream that fails every write after `budget` bytes, as a cut network would.
struct Cut {
    inner: UnixStream,
    budget: usize,
}

impl Read for Cut {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Cut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.budget == 0 {
            let _ = self.inner.shutdown(std::net::Shutdown::Both);
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.budget);
        let n = self.inner.write(&buf[..n])?;
        self.budget -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_stream_cut_half_way_leaves_the_source_running_and_the_guest_exact() {
    let n = 300_000;
    let config = config(1, 64, &format!("dirty=8 count={n}"));
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, n / 20);
    for budget in [100, 2 << 20] {
        let (here, there) = UnixStream::pair().unwrap();
        let receiver = spawn_receiver(there, ReceiveOptions::default());
        let mut cut = Cut {
            inner: here,
            budget,
        };
        let err = migration::migrate(&vm, &mut cut, &MigrationOptions::default(), &mut |_| {})
            .unwrap_err();
        assert!(!err.handover_unknown(), "{err}");
        assert!(!vm.is_paused(), "the source runs on after: {err}");
        let receiver_err = receiver.join().unwrap().unwrap_err();
        eprintln!("cut after {budget} bytes: source: {err}; destination: {receiver_err}");
    }
    let before = counter(&vm);
    assert_eq!(vm.wait(Some(WAIT)), VmOutcome::Exit(0), "{}", console(&vm));
    assert!(counter(&vm) > before);
    assert!(console(&vm).contains(&vhpc_testguest::expected_count_line(n)));
}

#[test]
fn a_destination_that_refuses_or_gives_up_leaves_the_source_running() {
    let n = 200_000;
    let config = config(2, 32, &format!("smp=2 count={n}"));
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, n / 20);

    // Refused at the Hello: the VM does not fit the destination's limits.
    let (mut here, there) = UnixStream::pair().unwrap();
    let small = ReceiveOptions {
        limits: Some(HostLimits {
            max_vcpus: 1,
            host_memory_mib: 1 << 20,
        }),
        ..Default::default()
    };
    let receiver = spawn_receiver(there, small);
    let err =
        migration::migrate(&vm, &mut here, &MigrationOptions::default(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, MigrationError::Refused(_)), "{err}");
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert!(receiver.join().unwrap().is_err());
    assert!(!vm.is_paused());

    // Gives up after the state arrived (a destination that fails to rebuild the VM).
    let (mut here, mut there) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let hello = wire::read_frame(&mut there).unwrap();
        assert_eq!(hello.kind, Kind::Hello);
        wire::write_frame(&mut there, Kind::Accept, &[]).unwrap();
        loop {
            let f = wire::read_frame(&mut there).unwrap();
            if f.kind == Kind::State {
                break;
            }
        }
        wire::write_frame(&mut there, Kind::Abort, b"out of memory here").unwrap();
    });
    let err =
        migration::migrate(&vm, &mut here, &MigrationOptions::default(), &mut |_| {}).unwrap_err();
    fake.join().unwrap();
    assert!(
        matches!(err, MigrationError::PeerAborted(ref m) if m.contains("out of memory")),
        "{err}"
    );
    assert!(!vm.is_paused(), "resumed after the destination gave up");
    let before = counter(&vm);
    assert_eq!(vm.wait(Some(WAIT)), VmOutcome::Exit(0), "{}", console(&vm));
    assert!(counter(&vm) > before);
    assert!(console(&vm).contains(&vhpc_testguest::expected_count_line(n)));
}

/// Reads from fixed bytes, writes into the void.
struct Replay(std::io::Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_receiver_fed_damaged_streams_errs_and_never_panics() {
    // A valid start (Hello for a 16 MiB test guest, then a page), then damage.
    let mut good = Vec::new();
    let hello = wire::Hello {
        protocol: wire::PROTOCOL_VERSION,
        vhpc_version: "test".into(),
        host: vhpc_vmm::snapshot::HostInfo::current(),
        config: config(1, 16, "count=1"),
        labels: vec![("agent_version".into(), "test".into())],
    };
    wire::write_postcard(&mut good, Kind::Hello, &hello).unwrap();
    let page = vec![0x5au8; wire::PAGE_SIZE];
    wire::write_frame(
        &mut good,
        Kind::Pages,
        &wire::pages_payload(0x10_0000, &page),
    )
    .unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut cases: Vec<Vec<u8>> = vec![good.clone()];
    // A page outside guest memory, a wrong protocol version, a State that is not one.
    let mut outside = good.clone();
    wire::write_frame(
        &mut outside,
        Kind::Pages,
        &wire::pages_payload(1 << 40, &page),
    )
    .unwrap();
    cases.push(outside);
    let mut old = wire::Hello {
        protocol: 0,
        ..hello.clone()
    };
    old.protocol = 0;
    let mut v0 = Vec::new();
    wire::write_postcard(&mut v0, Kind::Hello, &old).unwrap();
    cases.push(v0);
    let mut bad_state = good.clone();
    wire::write_frame(&mut bad_state, Kind::State, b"not postcard").unwrap();
    cases.push(bad_state);
    for _ in 0..40 {
        let mut b = good.clone();
        for _ in 0..(next() % 3 + 1) {
            let at = (next() as usize) % b.len();
            b[at] = next() as u8;
        }
        b.truncate((next() as usize) % (b.len() + 1));
        cases.push(b);
    }
    for bytes in cases {
        let mut s = Replay(std::io::Cursor::new(bytes));
        let err = migration::receive(&mut s, io(), &ReceiveOptions::default(), &mut |_| {});
        assert!(
            err.is_err(),
            "a damaged or incomplete stream never yields a VM"
        );
    }
}
