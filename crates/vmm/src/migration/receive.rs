//! The destination side: check the Hello, take pages into fresh guest memory, rebuild the VM
//! from the final state, start it on Commit. Whatever goes wrong before Commit, the partial VM
//! is dropped (memory unmapped, KVM fds closed) and the error says why; the source, told with
//! an Abort where the stream still works, resumes.

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress};

use super::send::{expect, unexpected};
use super::wire::{self, FinalState, Hello, Kind};
use super::{MigrationError, Phase, Progress, ReceiveOptions};
use crate::memory::{self, GuestMemory};
use crate::snapshot::{HostInfo, components};
use crate::vm::{Vm, VmIo};

/// A VM that arrived.
pub struct Incoming {
    /// Running.
    pub vm: Vm,
    /// The source's labels (see [`wire::Hello::labels`]).
    pub labels: Vec<(String, String)>,
}

/// Receives a VM over `stream` and returns it running. `io` connects the new VM's console and
/// agent channel.
pub fn receive<S: Read + Write>(
    stream: &mut S,
    io: VmIo,
    opts: &ReceiveOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Incoming, MigrationError> {
    let result = receive_inner(stream, io, opts, progress);
    if let Err(e) = &result
        && !matches!(
            e,
            MigrationError::PeerAborted(_) | MigrationError::Refused(_)
        )
    {
        let _ = wire::write_frame(stream, Kind::Abort, e.to_string().as_bytes());
    }
    result
}

fn receive_inner<S: Read + Write>(
    stream: &mut S,
    io: VmIo,
    opts: &ReceiveOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Incoming, MigrationError> {
    let start = std::time::Instant::now();
    let mut hello: Hello = expect(stream, Kind::Hello)?.postcard()?;
    if let Some(adapt) = &opts.adapt_config {
        adapt(&mut hello.config);
    }
    if let Err(reason) = check_hello(&hello, opts) {
        let _ = wire::write_frame(stream, Kind::Refuse, reason.as_bytes());
        return Err(MigrationError::Refused(reason));
    }
    let mem = match memory::create(&hello.config.memory) {
        Ok(m) => m,
        Err(e) => {
            let reason = format!("cannot allocate the guest's memory here: {e}");
            let _ = wire::write_frame(stream, Kind::Refuse, reason.as_bytes());
            return Err(MigrationError::Refused(reason));
        }
    };
    wire::write_frame(stream, Kind::Accept, &[])?;
    let mut pages = 0u64;
    let state: FinalState = loop {
        let frame = wire::read_frame(stream)?;
        match frame.kind {
            Kind::Pages => pages += write_pages(&mem, &frame)?,
            Kind::RoundEnd => progress(&Progress {
                phase: Phase::Round,
                round: round_of(&frame)?,
                round_pages: 0,
                pages_sent: pages,
                remaining_pages: 0,
                elapsed: start.elapsed(),
            }),
            Kind::State => break frame.postcard()?,
            Kind::Abort => return Err(MigrationError::PeerAborted(frame.text())),
            other => return Err(unexpected(other, "Pages, RoundEnd or State")),
        }
    };
    if !opts.force
        && let Some(change) = state.disks.iter().find_map(|d| d.changed())
    {
        return Err(MigrationError::Refused(format!(
            "a disk differs from the source's view of it ({change}); migration needs the same disk files on both hosts (shared storage)"
        )));
    }
    let machine = components::decode_list(&state.components, hello.config.vcpus)
        .map_err(|e| MigrationError::Protocol(format!("the VM state does not decode: {e}")))?;
    let mut vm = Vm::restore_machine(&hello.config, io, &machine, mem)?;
    wire::write_frame(stream, Kind::Restored, &[])?;
    expect(stream, Kind::Commit)?;
    vm.start()?;
    // The VM is ours now, whether or not the source hears it.
    let _ = wire::write_frame(stream, Kind::Started, &[]);
    let _ = stream.flush();
    progress(&Progress {
        phase: Phase::Done,
        round: 0,
        round_pages: 0,
        pages_sent: pages,
        remaining_pages: 0,
        elapsed: start.elapsed(),
    });
    Ok(Incoming {
        vm,
        labels: hello.labels,
    })
}

fn check_hello(hello: &Hello, opts: &ReceiveOptions) -> Result<(), String> {
    if hello.protocol != wire::PROTOCOL_VERSION {
        return Err(format!(
            "migration protocol {} is not this vhpc's ({}); use the same vhpc version on both hosts",
            hello.protocol,
            wire::PROTOCOL_VERSION
        ));
    }
    let here = HostInfo::current();
    if hello.host.cpu_model != here.cpu_model && !opts.force {
        return Err(format!(
            "the source's CPU is \"{}\", this host's \"{}\": its vCPU state may not fit; migrate between hosts with the same CPU model, or force it",
            hello.host.cpu_model, here.cpu_model
        ));
    }
    if let Some(limits) = &opts.limits {
        hello
            .config
            .validate(limits)
            .map_err(|e| format!("the VM does not fit this host: {e}"))?;
    }
    for disk in &hello.config.disks {
        if !disk.path.exists() {
            return Err(format!(
                "disk {} does not exist here; migration needs the same disk files on both hosts (shared storage)",
                disk.path.display()
            ));
        }
    }
    Ok(())
}

/// Writes a Pages frame into guest memory; refuses pages outside it.
fn write_pages(mem: &GuestMemory, frame: &wire::Frame) -> Result<u64, MigrationError> {
    let (gpa, data) = frame.pages()?;
    mem.write_slice(data, GuestAddress(gpa)).map_err(|e| {
        MigrationError::Protocol(format!(
            "pages at {gpa:#x} (+{} bytes) are not in the guest's memory: {e}",
            data.len()
        ))
    })?;
    Ok((data.len() / wire::PAGE_SIZE) as u64)
}

fn round_of(frame: &wire::Frame) -> Result<u32, MigrationError> {
    frame
        .payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| MigrationError::Protocol("a RoundEnd frame without its round".into()))
}
