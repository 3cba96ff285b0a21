//! Why a VM stops: the events vCPU threads, devices and the console report to the VMM's
//! main loop, which turns the first of them into the VM's outcome.

use std::sync::mpsc::Sender;

use vhpc_devices::{PowerEvent, PowerEventHandler};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// The guest rebooted (ACPI reset register or i8042 reset).
    Reset,
    /// A vCPU triple-faulted: the CPU reset itself, which a guest never asks for.
    TripleFault { vcpu: u32 },
    /// The guest kernel panicked (seen on its console).
    Panic,
    /// The guest asked to stop with an exit status (the debug-exit port).
    Exit { status: u8 },
    /// KVM could not run the guest any further.
    Crash { vcpu: u32, reason: String },
}

/// Forwards device power events into the VM's event channel.
pub struct PowerEvents(pub Sender<VmEvent>);

impl PowerEventHandler for PowerEvents {
    fn power_event(&self, event: PowerEvent) {
        log::debug!("guest power event: {event:?}");
        let event = match event {
            PowerEvent::PowerOff => VmEvent::PowerOff,
            PowerEvent::Reset => VmEvent::Reset,
            PowerEvent::Exit { status } => VmEvent::Exit { status },
        };
        // The main loop may already be gone after an earlier event; nothing to do then.
        let _ = self.0.send(event);
    }
}
