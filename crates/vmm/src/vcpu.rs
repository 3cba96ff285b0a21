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
//! it) returns promptly. The exit handler is a plain function, tested without a guest.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vhpc_devices::bus::PioBus;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::events::VmEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Exit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Paused,
    Exiting,
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

/// Handles one KVM exit: port I/O goes to the bus (reads of ports nobody owns return all-ones,
/// as on real hardware), MMIO nobody owns reads all-ones, and exits that end the VM say why.
pub fn handle_exit(index: u32, exit: VcpuExit<'_>, io: &PioBus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !io.read(port, data) {
                data.fill(0xff);
                log::debug!("vcpu{index}: read of unhandled port {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !io.write(port, data) {
                log::debug!("vcpu{index}: write to unhandled port {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            log::debug!("vcpu{index}: read of unhandled MMIO {addr:#x}");
            data.fill(0xff);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, _) => {
            log::debug!("vcpu{index}: write to unhandled MMIO {addr:#x}");
            ExitAction::Continue
        }
        // Without an in-kernel irqchip a halted vCPU with interrupts off can never wake up.
        VcpuExit::Hlt => ExitAction::Stop(VmEvent::PowerOff),
        // A triple fault: what a PC does then is reset.
        VcpuExit::Shutdown => ExitAction::Stop(VmEvent::Reset),
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

fn crash(vcpu: u32, reason: String) -> ExitAction {
    ExitAction::Stop(VmEvent::Crash { vcpu, reason })
}

/// A running vCPU thread, as the VMM's main thread sees it.
pub struct VcpuHandle {
    index: u32,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<VcpuState>>,
}

impl VcpuHandle {
    /// Starts vCPU `index` on its own thread. Events that end the VM go to `events`.
    pub fn spawn(
        index: u32,
        fd: VcpuFd,
        io: Arc<PioBus>,
        events: Sender<VmEvent>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                VcpuThread {
                    index,
                    fd,
                    io,
                    events,
                    commands: rx,
                }
                .run()
            })?;
        Ok(VcpuHandle {
            index,
            commands: tx,
            thread: Some(thread),
        })
    }

    /// Sends a command and kicks the thread out of KVM_RUN so it acts on it now.
    pub fn send(&self, command: VcpuCommand) {
        if self.commands.send(command).is_err() {
            return; // The thread has already ended.
        }
        if let Some(t) = &self.thread
            && let Err(e) = t.kill(kick_signal())
        {
            log::warn!("vcpu{}: cannot kick thread: {e}", self.index);
        }
    }

    /// Asks the thread to exit and waits for it; returns its final state.
    pub fn exit_and_join(mut self) -> Option<VcpuState> {
        self.send(VcpuCommand::Exit);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

struct VcpuThread {
    index: u32,
    fd: VcpuFd,
    io: Arc<PioBus>,
    events: Sender<VmEvent>,
    commands: Receiver<VcpuCommand>,
}

impl VcpuThread {
    fn run(mut self) -> VcpuState {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run()));
        let mut state = VcpuState::Running;
        while state != VcpuState::Exiting {
            state = match state {
                VcpuState::Running => self.running(),
                VcpuState::Paused => self.paused(),
                VcpuState::Exiting => VcpuState::Exiting,
            };
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        state
    }

    /// Applies a command to a state.
    /// Exiting is final: no command leads out of it.
    fn next(state: VcpuState, command: VcpuCommand) -> VcpuState {
        match (state, command) {
            (VcpuState::Exiting, _) | (_, VcpuCommand::Exit) => VcpuState::Exiting,
            (_, VcpuCommand::Pause) => VcpuState::Paused,
            (_, VcpuCommand::Resume) => VcpuState::Running,
        }
    }

    fn running(&mut self) -> VcpuState {
        match self.commands.try_recv() {
            Ok(cmd) => return Self::next(VcpuState::Running, cmd),
            Err(TryRecvError::Disconnected) => return VcpuState::Exiting,
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
            ExitAction::Continue => VcpuState::Running,
            ExitAction::Stop(event) => {
                let _ = self.events.send(event);
                // Wait to be told to exit, so the main thread decides the VM's fate.
                VcpuState::Paused
            }
        }
    }

    fn paused(&mut self) -> VcpuState {
        match self.commands.recv() {
            Ok(cmd) => Self::next(VcpuState::Paused, cmd),
            Err(_) => VcpuState::Exiting,
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

    fn bus() -> (PioBus, Arc<Mutex<Echo>>) {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
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
            ExitAction::Stop(VmEvent::Reset)
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
        use VcpuState::*;
        assert_eq!(VcpuThread::next(Running, Pause), Paused);
        assert_eq!(VcpuThread::next(Paused, Resume), Running);
        assert_eq!(VcpuThread::next(Paused, Exit), Exiting);
        assert_eq!(VcpuThread::next(Running, Exit), Exiting);
        assert_eq!(VcpuThread::next(Exiting, Resume), Exiting);
    }
}
