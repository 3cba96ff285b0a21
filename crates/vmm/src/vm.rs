//! One VM from config to outcome: KVM VM with in-kernel irqchip and PIT, guest memory, the
//! legacy devices, the kernel loaded, one thread per vCPU, then wait for the first event that
//! ends the VM and shut everything down in order. [`Vm`] is the handle for everything in
//! between: pause, resume, dirty log, save and restore into a new VM.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vhpc_api::{HostLimits, VmConfig, VsockConfig};
use vhpc_devices::bus::{Buses, PioBus};
use vhpc_devices::serial::{COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT, SERIAL_PORT_LEN, SerialPort};
use vhpc_devices::{acpi_pm, debug_exit, i8042, rtc};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::boot::{self, BootEntry, GuestKind, guest_kind, loader, params, pvh};
use crate::console::{ConsoleLog, ConsoleSink};
use crate::device_state::{self, LegacyDevices};
use crate::events::{PowerEvents, VmEvent};
use crate::host::{self, KvmKind};
use crate::memory::{self, GuestMemory};
use crate::snapshot::CheckpointLink;
use crate::vcpu::{VcpuCommand, VcpuError, VcpuHandle, VcpuRunState, install_kick_handler};
use crate::vcpu_state::VcpuStateCaps;
use crate::vm_state::{self, IrqchipState, MachineState, VmState};
use crate::{acpi, cpuid, layout, vcpu_setup};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    PowerOff,
    /// The guest wrote this status to the debug-exit port.
    Exit(u8),
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
    /// A virtio-vsock device and the Unix socket that is its host end.
    pub vsock: Option<VsockConfig>,
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
    #[error(transparent)]
    VcpuState(#[from] VcpuError),
    #[error(transparent)]
    VmState(#[from] vm_state::VmStateError),
    #[error("the VM must be paused to save its state; pause it first")]
    NotPaused,
    #[error("the VM has not been started; start it (then pause it) before saving its state")]
    NotStarted,
    #[error("dirty logging is off; turn it on (set_dirty_logging) before reading the dirty log")]
    DirtyLogOff,
    #[error("cannot restore: {0}; restore with the config the state was saved with")]
    RestoreMismatch(String),
    #[error("device {name}: {source}")]
    DeviceState {
        name: String,
        source: vhpc_devices::persist::PersistError,
    },
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

/// This host's limits (opens /dev/kvm).
pub fn current_host_limits() -> Result<HostLimits, VmError> {
    Ok(host_limits(&Kvm::new().map_err(VmError::OpenKvm)?))
}

/// Boots the VM described by `config` and runs it until it ends.
pub fn run(config: &VmConfig, io: VmIo) -> Result<(VmOutcome, ConsoleLog), VmError> {
    let timeout = io.timeout;
    let mut vm = Vm::boot(config, io)?;
    vm.start()?;
    let outcome = vm.wait(timeout);
    let log = vm.console_log().clone();
    vm.shutdown();
    Ok((outcome, log))
}

/// One VM: its KVM fds, memory, devices and vCPU threads. Built by [`Vm::boot`] (fresh guest)
/// or [`Vm::restore`] (from a [`VmState`]), started by [`Vm::start`], then paused, resumed,
/// saved and watched until it ends; dropping it stops and joins every vCPU thread.
pub struct Vm {
    /// Shared with the MSI router, which reprograms GSI routes from vCPU threads.
    fd: Arc<VmFd>,
    mem: GuestMemory,
    caps: Arc<VcpuStateCaps>,
    bus: Arc<Buses>,
    /// vCPU fds before [`Vm::start`]; their threads after.
    pending: Vec<VcpuFd>,
    vcpus: Vec<VcpuHandle>,
    events_tx: Sender<VmEvent>,
    events: Mutex<Receiver<VmEvent>>,
    log: ConsoleLog,
    /// The port-I/O devices whose state is saved.
    legacy: LegacyDevices,
    paused: AtomicBool,
    dirty_logging: AtomicBool,
    config: VmConfig,
    /// The checkpoint the dirty log counts from (set by a checkpoint, for the next
    /// incremental one).
    last_checkpoint: Mutex<Option<CheckpointLink>>,
}

impl Vm {
    /// Creates a VM and loads the guest; its vCPUs are ready at the entry point, not running.
    pub fn boot(config: &VmConfig, io: VmIo) -> Result<Vm, VmError> {
        let (kvm, kind) = open_kvm(config)?;
        let mem = memory::create(&config.memory)?;
        let mut vm = Vm::create(&kvm, config, mem, io.console, io.agent, io.vsock.as_ref())?;
        let (entry, all_at_entry) = load_guest(config, &vm.mem, &io.extra_initramfs, kind)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        for index in 0..config.vcpus {
            let fd = vm
                .fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let boot = (index == 0 || all_at_entry).then_some((&vm.mem, entry));
            vcpu_setup::configure(&fd, index, config.vcpus, &supported, boot)?;
            vm.pending.push(fd);
        }
        Ok(vm)
    }

    /// Creates a VM from a saved state: same config (memory size, vCPU count), fresh devices,
    /// the saved memory, interrupt controllers and vCPUs. Not running until [`Vm::start`].
    pub fn restore(config: &VmConfig, io: VmIo, state: &VmState) -> Result<Vm, VmError> {
        let mem = memory::create(&config.memory)?;
        vm_state::restore_memory(&mem, &state.memory)?;
        let saved = SavedMachine {
            vcpus: &state.vcpus,
            irqchip: &state.irqchip,
            devices: &state.devices,
        };
        Vm::restore_into(config, io, saved, mem)
    }

    /// Creates a VM around guest memory that already holds the saved contents (e.g. a lazily
    /// mapped checkpoint, see [`crate::snapshot`]) and restores interrupt controllers and
    /// vCPUs into it. Not running until [`Vm::start`].
    pub fn restore_machine(
        config: &VmConfig,
        io: VmIo,
        state: &MachineState,
        mem: GuestMemory,
    ) -> Result<Vm, VmError> {
        let saved = SavedMachine {
            vcpus: &state.vcpus,
            irqchip: &state.irqchip,
            devices: &state.devices,
        };
        Vm::restore_into(config, io, saved, mem)
    }

    fn restore_into(
        config: &VmConfig,
        io: VmIo,
        state: SavedMachine<'_>,
        mem: GuestMemory,
    ) -> Result<Vm, VmError> {
        let (vcpus, irqchip) = (state.vcpus, state.irqchip);
        if vcpus.len() != config.vcpus as usize {
            return Err(VmError::RestoreMismatch(format!(
                "the state has {} vCPUs, the config {}",
                vcpus.len(),
                config.vcpus
            )));
        }
        let (kvm, _) = open_kvm(config)?;
        let mut vm = Vm::create(&kvm, config, mem, io.console, io.agent, io.vsock.as_ref())?;
        irqchip.restore(&vm.fd)?;
        // After the irqchip (a serial port may raise its pending interrupt), before the vCPUs.
        device_state::restore(&vm.legacy, &vm.bus.pci, state.devices)?;
        for (index, saved) in vcpus.iter().enumerate() {
            let fd = vm
                .fd
                .create_vcpu(index as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            saved.restore(&fd).map_err(|source| VcpuError::State {
                index: index as u32,
                source,
            })?;
            vm.pending.push(fd);
        }
        Ok(vm)
    }

    /// The parts boot and restore share: memory, KVM VM, irqchip, PIT, devices.
    fn create(
        kvm: &Kvm,
        config: &VmConfig,
        mem: GuestMemory,
        console: Box<dyn Write + Send>,
        agent: Box<dyn Write + Send>,
        vsock: Option<&VsockConfig>,
    ) -> Result<Vm, VmError> {
        install_kick_handler().map_err(|e| VmError::Device {
            what: "the vCPU kick signal",
            detail: e.to_string(),
        })?;
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        register_memory(&fd, &mem, 0)?;
        setup_irqchip(&fd)?;
        let caps =
            Arc::new(VcpuStateCaps::probe(kvm, true).map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?);
        let (events_tx, events_rx) = channel();
        let log = ConsoleLog::default();
        let console = ConsoleSink::new(console, log.clone(), events_tx.clone());
        let (mut pio, legacy) = build_devices(&fd, Box::new(console), agent, &events_tx)?;
        let pci =
            crate::pci_devices::build(&fd, &mem, &config.disks, &config.nets, vsock, &mut pio)?;
        let bus = Arc::new(Buses { pio, pci });
        Ok(Vm {
            fd,
            mem,
            caps,
            bus,
            pending: Vec::new(),
            vcpus: Vec::new(),
            events_tx,
            events: Mutex::new(events_rx),
            log,
            legacy,
            paused: AtomicBool::new(false),
            dirty_logging: AtomicBool::new(false),
            config: config.clone(),
            last_checkpoint: Mutex::new(None),
        })
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmError> {
        for fd in std::mem::take(&mut self.pending) {
            let index = self.vcpus.len() as u32;
            let handle = VcpuHandle::spawn(
                index,
                fd,
                self.bus.clone(),
                self.events_tx.clone(),
                self.caps.clone(),
            )
            .map_err(VmError::Thread)?;
            self.vcpus.push(handle);
        }
        Ok(())
    }

    /// Waits for the first event that ends the VM (or `timeout`). The vCPUs are stopped then,
    /// but the VM still exists: its memory, dirty log and state can be read.
    pub fn wait(&self, timeout: Option<Duration>) -> VmOutcome {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        wait_for_end(&events, &self.log, timeout)
    }

    /// Stops every vCPU between two instructions; returns when all have stopped. Takes
    /// `&self` so one thread can [`Vm::wait`] while another pauses; callers that pause and
    /// resume from several threads serialise those calls themselves.
    /// The devices are paused after the vCPUs: a virtio device finishes the requests it took
    /// and stops its worker thread, so nothing is in flight and guest memory stays still.
    pub fn pause(&self) -> Result<(), VmError> {
        self.command_all(VcpuCommand::Pause, VcpuRunState::Paused)?;
        self.bus.pci.pause_devices();
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets the devices, then every vCPU, run again.
    pub fn resume(&self) -> Result<(), VmError> {
        self.bus.pci.resume_devices();
        self.command_all(VcpuCommand::Resume, VcpuRunState::Running)?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Ends the VM from the host: [`Vm::wait`] returns [`VmOutcome::PowerOff`] as if the guest
    /// had powered off (the vCPUs stay where they are, e.g. paused after a final checkpoint).
    pub fn stop(&self) {
        let _ = self.events_tx.send(VmEvent::PowerOff);
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn command_all(&self, command: VcpuCommand, state: VcpuRunState) -> Result<(), VmError> {
        for vcpu in &self.vcpus {
            vcpu.send(command);
        }
        for vcpu in &self.vcpus {
            vcpu.wait_for(state)?;
        }
        Ok(())
    }

    /// Saves the whole VM; it must be paused ([`Vm::pause`]).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let machine = self.save_machine()?;
        Ok(VmState {
            vcpus: machine.vcpus,
            irqchip: machine.irqchip,
            devices: machine.devices,
            memory: vm_state::save_memory(&self.mem)?,
        })
    }

    /// Saves everything but guest memory (vCPUs, interrupt controllers, PIT, clock, device
    /// models); the VM must be paused ([`Vm::pause`]).
    pub fn save_machine(&self) -> Result<MachineState, VmError> {
        if !self.pending.is_empty() {
            return Err(VmError::NotStarted);
        }
        if !self.is_paused() {
            return Err(VmError::NotPaused);
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            vcpus,
            irqchip: IrqchipState::save(&self.fd)?,
            devices: device_state::save(&self.legacy, &self.bus.pci)?,
        })
    }

    /// Whether KVM's dirty log is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::SeqCst)
    }

    /// The config the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The last checkpoint taken of this VM, which the dirty log counts from.
    pub(crate) fn last_checkpoint(&self) -> Option<CheckpointLink> {
        self.last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_last_checkpoint(&self, link: Option<CheckpointLink>) {
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = link;
    }

    /// Starts or stops KVM's dirty-page log for all guest memory. Starting it also clears the
    /// VMM's own dirty bitmap, so both count from now.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        register_memory(&self.fd, &self.mem, flags)?;
        if on {
            for region in self.mem.iter() {
                vmm_bitmap(region).reset();
            }
        }
        self.dirty_logging.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Guest-physical addresses of the pages written since dirty logging started or since
    /// the last call, in ascending order: the guest's writes (KVM_GET_DIRTY_LOG, which clears
    /// the log) together with those of the VMM's device threads through guest memory (used
    /// rings, disk reads: vm-memory's dirty bitmap, cleared too). The VMM's writes while
    /// loading or restoring a guest come before dirty logging starts and are not counted.
    pub fn dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        if !self.dirty_logging() {
            return Err(VmError::DirtyLogOff);
        }
        let mut pages = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut bitmap = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let by_vmm = vmm_bitmap(region).get_and_reset();
            for (word, extra) in bitmap.iter_mut().zip(by_vmm) {
                *word |= extra;
            }
            pages.extend(dirty_addresses(region.start_addr().0, &bitmap));
        }
        Ok(pages)
    }

    /// Guest memory (readable at any time; stable while paused).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The guest console's log so far.
    pub fn console_log(&self) -> &ConsoleLog {
        &self.log
    }

    /// Stops and joins every vCPU thread (also done on drop).
    pub fn shutdown(self) {}
}

impl Drop for Vm {
    fn drop(&mut self) {
        for vcpu in self.vcpus.drain(..) {
            vcpu.exit_and_join();
        }
    }
}

/// Borrowed parts of a saved VM, from a [`VmState`] or a [`MachineState`].
struct SavedMachine<'a> {
    vcpus: &'a [crate::VcpuState],
    irqchip: &'a IrqchipState,
    devices: &'a [device_state::DeviceSnapshot],
}

/// The VMM's own dirty bitmap of a region (vm-memory's, set by writes through it).
fn vmm_bitmap(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> &vm_memory::bitmap::AtomicBitmap {
    let mapping: &vm_memory::mmap::MmapRegion<_> = region;
    mapping.bitmap()
}

/// Page addresses of the set bits of a KVM dirty bitmap for a region starting at `start`.
fn dirty_addresses(start: u64, bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(move |(word, &bits)| {
        (0..64)
            .filter(move |bit| bits & (1 << bit) != 0)
            .map(move |bit| start + ((word as u64 * 64 + bit) << 12))
    })
}

/// Opens KVM, validates the config against it, and refuses guests this host cannot run.
fn open_kvm(config: &VmConfig) -> Result<(Kvm, Option<GuestKind>), VmError> {
    let kind = host::kvm_kind();
    if kind == KvmKind::Missing {
        return Err(VmError::NoKvm);
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    config.validate(&host_limits(&kvm))?;
    let guest = guest_kind::classify(&config.kernel).ok().flatten();
    if kind == KvmKind::Pvm {
        match guest {
            Some(GuestKind::Linux) => return Err(VmError::PvmCannotBootLinux),
            Some(GuestKind::Freestanding {
                general_regs_only: false,
                ..
            }) => log::warn!(
                "{} does not declare (vhpc ELF note) that it uses general registers only; this host's kvm_pvm stops it at its first x87/SSE instruction",
                config.kernel.display()
            ),
            _ => {}
        }
    }
    Ok((kvm, guest))
}

/// Registers (or re-registers, to change `flags`) one memslot per RAM region.
fn register_memory(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`; `mem` and the VM fd live in
        // the same `Vm`, whose Drop joins the vCPU threads before either is dropped.
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
) -> Result<(PioBus, LegacyDevices), VmError> {
    let dev_err = |what| {
        move |e: &dyn std::fmt::Display| VmError::Device {
            what,
            detail: e.to_string(),
        }
    };
    let power = Arc::new(PowerEvents(events.clone()));
    let mut bus = PioBus::default();
    let mut saved = LegacyDevices::default();
    for (port, irq, out, what, name) in [
        (
            COM1_PORT,
            COM1_IRQ,
            console,
            "serial console (COM1)",
            "dev.com1",
        ),
        (
            COM2_PORT,
            COM2_IRQ,
            agent,
            "agent serial port (COM2)",
            "dev.com2",
        ),
    ] {
        let serial = SerialPort::new(out).map_err(|e| dev_err(what)(&e))?;
        vm.register_irqfd(serial.interrupt_evt(), irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(serial));
        bus.insert(port, SERIAL_PORT_LEN, serial.clone())
            .map_err(|e| dev_err(what)(&e))?;
        saved.0.push((name, serial));
    }
    let keyboard = i8042::I8042::new(power.clone()).map_err(|e| dev_err("i8042")(&e))?;
    let keyboard = Arc::new(Mutex::new(keyboard));
    bus.insert(i8042::I8042_PORT, i8042::I8042_LEN, keyboard.clone())
        .map_err(|e| dev_err("i8042")(&e))?;
    saved.0.push(("dev.i8042", keyboard));
    let clock = Arc::new(Mutex::new(rtc::CmosRtc::new()));
    bus.insert(rtc::RTC_PORT, rtc::RTC_LEN, clock.clone())
        .map_err(|e| dev_err("CMOS RTC")(&e))?;
    saved.0.push(("dev.rtc", clock));
    let pm = Arc::new(Mutex::new(acpi_pm::AcpiPmDevice::new(power.clone())));
    bus.insert(acpi_pm::ACPI_PM_PORT, acpi_pm::ACPI_PM_LEN, pm.clone())
        .map_err(|e| dev_err("ACPI power management")(&e))?;
    saved.0.push(("dev.acpi_pm", pm));
    let exit = debug_exit::DebugExit::new(power);
    bus.insert(
        debug_exit::DEBUG_EXIT_PORT,
        debug_exit::DEBUG_EXIT_LEN,
        Arc::new(Mutex::new(exit)),
    )
    .map_err(|e| dev_err("debug-exit port")(&e))?;
    Ok((bus, saved))
}

/// Loads kernel, initramfs, command line, ACPI tables and the boot protocol's structures
/// (PVH start info for an ELF with a PVH note, else boot_params). Returns the entry and
/// whether every vCPU starts there (a freestanding guest that declares it).
fn load_guest(
    config: &VmConfig,
    mem: &GuestMemory,
    extra: &[u8],
    kind: Option<GuestKind>,
) -> Result<(BootEntry, bool), VmError> {
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

    if let Some(entry) = kernel.pvh_entry {
        let max = params::cmdline_max(&kernel);
        if cmdline.len() > max {
            return Err(boot::BootError::CmdlineTooLong {
                len: cmdline.len(),
                max,
            }
            .into());
        }
        let info = pvh::PvhInfo {
            cmdline_addr: layout::CMDLINE_START,
            initramfs,
            rsdp_addr: tables.rsdp_addr,
        };
        pvh::write(mem, &info)?;
        let all_at_entry = matches!(
            kind,
            Some(GuestKind::Freestanding {
                all_vcpus_at_entry: true,
                ..
            })
        );
        return Ok((BootEntry::Pvh { entry }, all_at_entry));
    }
    let info = params::BootInfo {
        kernel: &kernel,
        cmdline_len: cmdline.len(),
        initramfs,
        rsdp_addr: tables.rsdp_addr,
    };
    params::write(mem, &params::build(mem, &info)?)?;
    Ok((
        BootEntry::Linux64 {
            entry: kernel.entry,
        },
        false,
    ))
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
        VmEvent::Exit { status } => VmOutcome::Exit(status),
        VmEvent::Reset if log.panicked() => VmOutcome::Panic,
        VmEvent::Reset => VmOutcome::Reset,
        VmEvent::Panic => VmOutcome::Panic,
        VmEvent::TripleFault { vcpu } => VmOutcome::Crash(format!(
            "vcpu{vcpu} triple-faulted (the guest crashed so hard its CPU reset)"
        )),
        VmEvent::Crash { vcpu, reason } => VmOutcome::Crash(format!("vcpu{vcpu}: {reason}")),
    }
}
