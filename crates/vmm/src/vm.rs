//! One VM from config to outcome: KVM VM with in-kernel irqchip and PIT, guest memory, the
//! legacy devices, the kernel loaded, one thread per vCPU, then wait for the first event that
//! ends the VM and shut everything down in order.

use std::io::Write;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vhpc_api::{HostLimits, VmConfig};
use vhpc_devices::bus::PioBus;
use vhpc_devices::serial::{COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT, SERIAL_PORT_LEN, SerialPort};
use vhpc_devices::{acpi_pm, i8042, rtc};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::boot::{self, KernelFormat, loader, params};
use crate::console::{ConsoleLog, ConsoleSink};
use crate::events::{PowerEvents, VmEvent};
use crate::host::{self, KvmKind};
use crate::memory::{self, GuestMemory};
use crate::vcpu::{VcpuHandle, install_kick_handler};
use crate::{acpi, cpuid, layout, vcpu_setup};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    PowerOff,
    Reset,
    Panic,
    Crash(String),
    TimedOut,
}

/// The VM's connections to the world.
pub struct VmIo {
    /// Where the console (COM1, the kernel's ttyS0) goes.
    pub console: Box<dyn Write + Send>,
    /// Where the agent channel (COM2, ttyS1) goes.
    pub agent: Box<dyn Write + Send>,
    /// A further cpio archive appended to the initramfs (e.g. the command to run).
    pub extra_initramfs: Vec<u8>,
    /// Stop the VM if it runs longer than this.
    pub timeout: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "/dev/kvm is missing or not accessible: vhpc needs KVM (load kvm-intel or kvm-amd, or run inside `vhpc lab run`)"
    )]
    NoKvm,
    #[error(
        "this host's /dev/kvm is kvm_pvm, a software backend without VMX/SVM that stops a guest at its first x87/SSE instruction: a stock Linux kernel cannot boot here on any VMM. Run it in the nested-KVM lab instead: vhpc lab run -- vhpc run -- CMD"
    )]
    PvmCannotBootLinux,
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error(transparent)]
    Config(#[from] vhpc_api::ConfigError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    VcpuSetup(#[from] vcpu_setup::VcpuSetupError),
    #[error("cannot build the ACPI tables: {0}")]
    Acpi(String),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up device {what}: {detail}")]
    Device { what: &'static str, detail: String },
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Host limits for config validation.
pub fn host_limits(kvm: &Kvm) -> HostLimits {
    HostLimits {
        max_vcpus: kvm.get_max_vcpus() as u32,
        host_memory_mib: host::memory_mib(),
    }
}

/// Boots the VM described by `config` and runs it until it ends.
pub fn run(config: &VmConfig, io: VmIo) -> Result<(VmOutcome, ConsoleLog), VmError> {
    let kind = host::kvm_kind();
    if kind == KvmKind::Missing {
        return Err(VmError::NoKvm);
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    config.validate(&host_limits(&kvm))?;
    if kind == KvmKind::Pvm && is_linux_kernel(&config.kernel) {
        return Err(VmError::PvmCannotBootLinux);
    }
    install_kick_handler().map_err(|e| VmError::Device {
        what: "the vCPU kick signal",
        detail: e.to_string(),
    })?;

    let mem = memory::create(&config.memory)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    register_memory(&vm, &mem)?;
    setup_irqchip(&vm)?;

    let (events_tx, events_rx) = channel();
    let log = ConsoleLog::default();
    let console = ConsoleSink::new(io.console, log.clone(), events_tx.clone());
    let bus = Arc::new(build_devices(&vm, Box::new(console), io.agent, &events_tx)?);

    let entry = load_guest(config, &mem, &io.extra_initramfs)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for index in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let boot = (index == 0).then_some((&mem, entry));
        vcpu_setup::configure(&fd, index, config.vcpus, &supported, boot)?;
        vcpus.push(fd);
    }
    let handles = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, fd)| VcpuHandle::spawn(i as u32, fd, bus.clone(), events_tx.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(VmError::Thread)?;

    let outcome = wait_for_end(&events_rx, &log, io.timeout);
    for h in handles {
        h.exit_and_join();
    }
    Ok((outcome, log))
}

fn is_linux_kernel(path: &std::path::Path) -> bool {
    std::fs::File::open(path)
        .and_then(|mut f| loader::detect_format(&mut f))
        .is_ok_and(|f| f == Some(KernelFormat::BzImage))
}

fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which outlives the VM fd in
        // every caller (both are dropped at the end of `run`, the VM's vCPUs joined before).
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn setup_irqchip(vm: &VmFd) -> Result<(), VmError> {
    // Needed by Intel VMX for real-mode emulation; a harmless reservation elsewhere.
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))
}

fn build_devices(
    vm: &VmFd,
    console: Box<dyn Write + Send>,
    agent: Box<dyn Write + Send>,
    events: &Sender<VmEvent>,
) -> Result<PioBus, VmError> {
    let dev_err = |what| {
        move |e: &dyn std::fmt::Display| VmError::Device {
            what,
            detail: e.to_string(),
        }
    };
    let power = Arc::new(PowerEvents(events.clone()));
    let mut bus = PioBus::default();
    for (port, irq, out, what) in [
        (COM1_PORT, COM1_IRQ, console, "serial console (COM1)"),
        (COM2_PORT, COM2_IRQ, agent, "agent serial port (COM2)"),
    ] {
        let serial = SerialPort::new(out).map_err(|e| dev_err(what)(&e))?;
        vm.register_irqfd(serial.interrupt_evt(), irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        bus.insert(port, SERIAL_PORT_LEN, Arc::new(Mutex::new(serial)))
            .map_err(|e| dev_err(what)(&e))?;
    }
    let keyboard = i8042::I8042::new(power.clone()).map_err(|e| dev_err("i8042")(&e))?;
    bus.insert(
        i8042::I8042_PORT,
        i8042::I8042_LEN,
        Arc::new(Mutex::new(keyboard)),
    )
    .map_err(|e| dev_err("i8042")(&e))?;
    bus.insert(
        rtc::RTC_PORT,
        rtc::RTC_LEN,
        Arc::new(Mutex::new(rtc::CmosRtc::new())),
    )
    .map_err(|e| dev_err("CMOS RTC")(&e))?;
    let pm = acpi_pm::AcpiPmDevice::new(power);
    bus.insert(
        acpi_pm::ACPI_PM_PORT,
        acpi_pm::ACPI_PM_LEN,
        Arc::new(Mutex::new(pm)),
    )
    .map_err(|e| dev_err("ACPI power management")(&e))?;
    Ok(bus)
}

/// Loads kernel, initramfs, command line, ACPI tables and boot_params; returns the entry point.
fn load_guest(config: &VmConfig, mem: &GuestMemory, extra: &[u8]) -> Result<u64, VmError> {
    let kernel = loader::load_kernel(mem, &config.kernel)?;
    let initramfs = loader::load_initramfs(mem, config.initramfs.as_deref(), extra, &kernel)?;
    let cmdline = config.cmdline.as_bytes();
    let mut with_nul = cmdline.to_vec();
    with_nul.push(0);
    mem.write_slice(&with_nul, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| boot::BootError::GuestWrite {
            what: "the command line",
            detail: e.to_string(),
        })?;

    let acpi_config = acpi::AcpiConfig {
        cpu_apic_ids: (0..config.vcpus).map(|i| cpuid::apic_id(i) as u8).collect(),
        ioapic_addr: layout::IOAPIC_ADDR,
        ioapic_id: config.vcpus.min(254) as u8,
        lapic_addr: layout::LAPIC_ADDR,
    };
    let tables = acpi::build(&acpi_config, layout::ACPI_TABLES_START)
        .map_err(|e| VmError::Acpi(e.to_string()))?;
    mem.write_slice(&tables.bytes, GuestAddress(layout::ACPI_TABLES_START))
        .map_err(|e| VmError::Acpi(e.to_string()))?;

    let info = params::BootInfo {
        kernel: &kernel,
        cmdline_len: cmdline.len(),
        initramfs,
        rsdp_addr: tables.rsdp_addr,
    };
    params::write(mem, &params::build(mem, &info)?)?;
    Ok(kernel.entry)
}

/// Waits for the first event that ends the VM. A reset right after a panic report is the
/// panic (the kernel reboots itself with panic=-1).
fn wait_for_end(
    events: &Receiver<VmEvent>,
    log: &ConsoleLog,
    timeout: Option<Duration>,
) -> VmOutcome {
    let event = match timeout {
        Some(t) => match events.recv_timeout(t) {
            Ok(e) => e,
            Err(_) => return VmOutcome::TimedOut,
        },
        None => match events.recv() {
            Ok(e) => e,
            Err(_) => return VmOutcome::Crash("every vCPU thread ended".into()),
        },
    };
    match event {
        VmEvent::PowerOff => VmOutcome::PowerOff,
        VmEvent::Reset if log.panicked() => VmOutcome::Panic,
        VmEvent::Reset => VmOutcome::Reset,
        VmEvent::Panic => VmOutcome::Panic,
        VmEvent::Crash { vcpu, reason } => VmOutcome::Crash(format!("vcpu{vcpu}: {reason}")),
    }
}
