//! One thread per vCPU, driven by an explicit state machine.
//!
//! ```text
//!            Pause               Exit
//!  Running ---------> Paused ----------> Exiting
//!     ^  <-------------  |                  ^
//!     |      Resume                         |
//!     +-------------------------------------+  Exit, or an exit that ends the VM
//! ```
//!
//! Commands arrive on a channel; the sender then "kicks" the thread with a signal whose handler
//! sets `immediate_exit` in the vCPU's kvm_run, so a vCPU inside KVM_RUN (or about to enter
//! it) returns promptly. Pause and Resume are answered once they have taken effect; on the way
//! to Paused the thread lets KVM finish an instruction whose port I/O it was waiting for, so
//! a paused vCPU's state is complete and can be saved (on the thread that owns the vCPU fd).
//! The exit handler is a plain function, tested without a guest.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vhpc_devices::bus::Buses;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::events::VmEvent;
use crate::vcpu_state::{VcpuState, VcpuStateCaps, VcpuStateError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Exit,
}

/// Where a vCPU thread is in its life (the snapshot of its registers is [`VcpuState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    Running,
    Paused,
    Exiting,
}

/// What the VMM asks a vCPU thread.
enum VcpuRequest {
    Command(VcpuCommand),
    /// Read the vCPU's state (only while paused).
    SaveState,
}

/// What a vCPU thread answers.
enum VcpuReply {
    /// The state a Pause or Resume command led to.
    Now(VcpuRunState),
    Saved(Box<Result<VcpuState, VcpuError>>),
}

/// How long the VMM waits for a vCPU thread to act on a request. A vCPU leaves KVM_RUN within
/// one emulated instruction after a kick; seconds mean the thread is stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vcpu{index} did not answer within {REPLY_TIMEOUT:?}; its thread is stuck or gone")]
    NoReply { index: u32 },
    #[error("vcpu{index} must be paused to save its state; pause the VM first")]
    NotPaused { index: u32 },
    #[error("vcpu{index}: {source}")]
    State {
        index: u32,
        #[source]
        source: VcpuStateError,
    },
}

/// What the run loop does after a KVM exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Stop(VmEvent),
}

/// The signal that kicks vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread before
        // it first enters KVM_RUN and cleared before the VcpuFd (and mapping) is dropped.
        // A single byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), kick_handler));
    result
}

/// Handles one KVM exit: port I/O goes to the port bus (reads of ports nobody owns return
/// all-ones, as on real hardware), MMIO to the PCI devices' BARs (MMIO nobody owns reads
/// all-ones), and exits that end the VM say why.
pub fn handle_exit(index: u32, exit: VcpuExit<'_>, buses: &Buses) -> ExitAction {
    let io = &buses.pio;
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !io.read(port, data) {
                data.fill(0xff);
                log::debug!("vcpu{index}: read of unhandled port {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            log::trace!("vcpu{index}: out {port:#x} {data:x?}");
            if !io.write(port, data) {
                log::debug!("vcpu{index}: write to unhandled port {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.pci.mmio_read(addr, data) {
                log::debug!("vcpu{index}: read of unhandled MMIO {addr:#x}");
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.pci.mmio_write(addr, data) {
                log::debug!("vcpu{index}: write to unhandled MMIO {addr:#x}");
            }
            ExitAction::Continue
        }
        // Without an in-kernel irqchip a halted vCPU with interrupts off can never wake up.
        VcpuExit::Hlt => ExitAction::Stop(VmEvent::PowerOff),
        // A triple fault: a PC resets, but for a guest it means it crashed.
        VcpuExit::Shutdown => ExitAction::Stop(VmEvent::TripleFault { vcpu: index }),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(VmEvent::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(VmEvent::Reset),
            other => crash(index, format!("system event {other}")),
        },
        VcpuExit::FailEntry(reason, cpu) => crash(
            index,
            format!(
                "KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
            ),
        ),
        VcpuExit::InternalError => crash(
            index,
            "KVM internal error (the host's KVM could not emulate a guest instruction)".into(),
        ),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        other => crash(index, format!("unexpected KVM exit {other:?}")),
    }
}

/// Where a vCPU was, for the log of a crash: instruction and stack pointers, control
/// registers and EFER (what a triple fault's cause is read from).
fn describe_cpu(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} \
             efer={:#x} cs={:#x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unreadable ({e})"),
    }
}

fn crash(vcpu: u32, reason: String) -> ExitAction {
    ExitAction::Stop(VmEvent::Crash { vcpu, reason })
}

/// A running vCPU thread, as the VMM's main thread sees it.
pub struct VcpuHandle {
    index: u32,
    requests: Sender<VcpuRequest>,
    replies: Mutex<Receiver<VcpuReply>>,
    thread: Option<JoinHandle<VcpuRunState>>,
}

impl VcpuHandle {
    /// Starts vCPU `index` on its own thread. Events that end the VM go to `events`.
    pub fn spawn(
        index: u32,
        fd: VcpuFd,
        io: Arc<Buses>,
        events: Sender<VmEvent>,
        caps: Arc<VcpuStateCaps>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                VcpuThread {
                    index,
                    fd,
                    io,
                    events,
                    requests: rx,
                    replies: reply_tx,
                    caps,
                }
                .run()
            })?;
        Ok(VcpuHandle {
            index,
            requests: tx,
            replies: Mutex::new(reply_rx),
            thread: Some(thread),
        })
    }

    /// Sends a command and kicks the thread out of KVM_RUN so it acts on it now. Pause and
    /// Resume are answered: collect the answer with [`VcpuHandle::wait_for`].
    pub fn send(&self, command: VcpuCommand) {
        self.request(VcpuRequest::Command(command));
    }

    fn request(&self, request: VcpuRequest) {
        // Answers to requests that timed out earlier must not be taken for this one's.
        while self.lock_replies().try_recv().is_ok() {}
        if self.requests.send(request).is_err() {
            return; // The thread has already ended.
        }
        if let Some(t) = &self.thread
            && let Err(e) = t.kill(kick_signal())
        {
            log::warn!("vcpu{}: cannot kick thread: {e}", self.index);
        }
    }

    fn lock_replies(&self) -> std::sync::MutexGuard<'_, Receiver<VcpuReply>> {
        self.replies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reply(&self) -> Result<VcpuReply, VcpuError> {
        self.lock_replies()
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| VcpuError::NoReply { index: self.index })
    }

    /// Waits until the thread reports `state` (after a Pause or Resume sent with `send`).
    pub fn wait_for(&self, state: VcpuRunState) -> Result<(), VcpuError> {
        loop {
            if let VcpuReply::Now(now) = self.reply()?
                && now == state
            {
                return Ok(());
            }
        }
    }

    /// The vCPU's state; the vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        self.request(VcpuRequest::SaveState);
        loop {
            if let VcpuReply::Saved(result) = self.reply()? {
                return *result;
            }
        }
    }

    /// Asks the thread to exit and waits for it; returns its final state.
    pub fn exit_and_join(mut self) -> Option<VcpuRunState> {
        self.send(VcpuCommand::Exit);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

struct VcpuThread {
    index: u32,
    fd: VcpuFd,
    io: Arc<Buses>,
    events: Sender<VmEvent>,
    requests: Receiver<VcpuRequest>,
    replies: Sender<VcpuReply>,
    caps: Arc<VcpuStateCaps>,
}

impl VcpuThread {
    fn run(mut self) -> VcpuRunState {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run()));
        let mut state = VcpuRunState::Running;
        while state != VcpuRunState::Exiting {
            state = match state {
                VcpuRunState::Running => self.running(),
                VcpuRunState::Paused => self.paused(),
                VcpuRunState::Exiting => VcpuRunState::Exiting,
            };
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        state
    }

    /// Applies a command to a state.
    /// Exiting is final: no command leads out of it.
    fn next(state: VcpuRunState, command: VcpuCommand) -> VcpuRunState {
        match (state, command) {
            (VcpuRunState::Exiting, _) | (_, VcpuCommand::Exit) => VcpuRunState::Exiting,
            (_, VcpuCommand::Pause) => VcpuRunState::Paused,
            (_, VcpuCommand::Resume) => VcpuRunState::Running,
        }
    }

    /// Acts on a request in `state`; returns the next state.
    fn handle(&mut self, state: VcpuRunState, request: VcpuRequest) -> VcpuRunState {
        match request {
            VcpuRequest::Command(command) => {
                let next = Self::next(state, command);
                if state == VcpuRunState::Running && next == VcpuRunState::Paused {
                    self.settle();
                }
                if next != VcpuRunState::Exiting {
                    let _ = self.replies.send(VcpuReply::Now(next));
                }
                next
            }
            VcpuRequest::SaveState => {
                let result = if state == VcpuRunState::Paused {
                    VcpuState::save(&self.fd, &self.caps).map_err(|source| VcpuError::State {
                        index: self.index,
                        source,
                    })
                } else {
                    Err(VcpuError::NotPaused { index: self.index })
                };
                let _ = self.replies.send(VcpuReply::Saved(Box::new(result)));
                state
            }
        }
    }

    /// Lets KVM complete an instruction that exited for port I/O or MMIO (an `in` whose data
    /// the VMM has supplied, a string instruction half done) without running the guest
    /// further, so the saved state is between two instructions.
    fn settle(&mut self) {
        for _ in 0..64 {
            self.fd.set_kvm_immediate_exit(1);
            let result = self.fd.run();
            let action = match result {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
                Err(e) => {
                    log::warn!("vcpu{}: KVM_RUN while pausing failed: {e}", self.index);
                    break;
                }
                Ok(exit) => handle_exit(self.index, exit, &self.io),
            };
            if let ExitAction::Stop(event) = action {
                let _ = self.events.send(event);
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn running(&mut self) -> VcpuRunState {
        match self.requests.try_recv() {
            Ok(request) => return self.handle(VcpuRunState::Running, request),
            Err(TryRecvError::Disconnected) => return VcpuRunState::Exiting,
            Err(TryRecvError::Empty) => {}
        }
        let action = match self.fd.run() {
            Ok(exit) => handle_exit(self.index, exit, &self.io),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                ExitAction::Continue
            }
            Err(e) => crash(self.index, format!("KVM_RUN failed: {e}")),
        };
        match action {
            ExitAction::Continue => VcpuRunState::Running,
            ExitAction::Stop(event) => {
                if matches!(event, VmEvent::TripleFault { .. } | VmEvent::Crash { .. }) {
                    // On AMD, KVM re-initialises a vCPU on a shutdown (triple fault) before
                    // returning it, so its registers then show the reset state, not where the
                    // guest failed; the log says which it is.
                    let after_reset = matches!(event, VmEvent::TripleFault { .. })
                        && self.fd.get_regs().is_ok_and(|r| r.rip == 0xfff0);
                    log::error!(
                        "vcpu{} stopped ({event:?}) with {}{}",
                        self.index,
                        describe_cpu(&self.fd),
                        if after_reset {
                            " (the reset state: KVM re-initialised the vCPU on the shutdown, \
                             so where the guest failed is lost)"
                        } else {
                            ""
                        }
                    );
                }
                let _ = self.events.send(event);
                // Wait to be told to exit, so the main thread decides the VM's fate.
                VcpuRunState::Paused
            }
        }
    }

    fn paused(&mut self) -> VcpuRunState {
        match self.requests.recv() {
            Ok(request) => self.handle(VcpuRunState::Paused, request),
            Err(_) => VcpuRunState::Exiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vhpc_devices::PioDevice;

    struct Echo(Vec<(u16, Vec<u8>)>);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn bus() -> (Buses, Arc<Mutex<Echo>>) {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Buses::default();
        bus.pio.insert(0x3f8, 8, dev.clone()).expect("insert");
        (bus, dev)
    }

    #[test]
    fn port_io_reaches_the_device() {
        let (bus, dev) = bus();
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(0, VcpuExit::IoIn(0x3fa, &mut data), &bus),
            ExitAction::Continue
        );
        assert_eq!(data, [3]);
        assert_eq!(
            handle_exit(0, VcpuExit::IoOut(0x3f8, b"A"), &bus),
            ExitAction::Continue
        );
        assert_eq!(dev.lock().expect("lock").0, vec![(0, b"A".to_vec())]);
    }

    #[test]
    fn unhandled_reads_return_all_ones() {
        let (bus, _) = bus();
        let mut data = [0u8; 4];
        handle_exit(0, VcpuExit::IoIn(0xcfc, &mut data), &bus);
        assert_eq!(data, [0xff; 4]);
        let mut mmio = [0u8; 2];
        handle_exit(0, VcpuExit::MmioRead(0xd000_0000, &mut mmio), &bus);
        assert_eq!(mmio, [0xff; 2]);
    }

    #[test]
    fn ending_exits_say_why() {
        let (bus, _) = bus();
        assert_eq!(
            handle_exit(0, VcpuExit::Shutdown, &bus),
            ExitAction::Stop(VmEvent::TripleFault { vcpu: 0 })
        );
        assert_eq!(
            handle_exit(
                0,
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &bus
            ),
            ExitAction::Stop(VmEvent::PowerOff)
        );
        assert!(matches!(
            handle_exit(2, VcpuExit::InternalError, &bus),
            ExitAction::Stop(VmEvent::Crash { vcpu: 2, .. })
        ));
    }

    #[test]
    fn state_machine_transitions() {
        use VcpuCommand::*;
        use VcpuRunState::*;
        assert_eq!(VcpuThread::next(Running, Pause), Paused);
        assert_eq!(VcpuThread::next(Paused, Resume), Running);
        assert_eq!(VcpuThread::next(Paused, Exit), Exiting);
        assert_eq!(VcpuThread::next(Running, Exit), Exiting);
        assert_eq!(VcpuThread::next(Exiting, Resume), Exiting);
    }
}
