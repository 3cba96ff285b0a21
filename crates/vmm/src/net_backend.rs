//! Opening a VM interface's host side: the TAP device `--net` names, or a new TAP attached
//! to a bridge, and the guest's MAC address.

use vhpc_api::{MacAddr, NetBackend, NetConfig, derived_tap_name};
use vhpc_devices::virtio::net::{Net, Tap, host_if};

use crate::vm::VmError;

fn err(e: &dyn std::fmt::Display) -> VmError {
    VmError::Device {
        what: "virtio-net",
        detail: e.to_string(),
    }
}

/// The device for interface `index` (eth`index` in the guest).
pub fn open(net: &NetConfig, index: usize) -> Result<Net, VmError> {
    let tap = match &net.backend {
        NetBackend::Tap { name } => {
            let tap = Tap::open(name).map_err(|e| err(&e))?;
            if tap.created() {
                tap.set_up().map_err(|e| err(&e))?;
                log::info!(
                    "eth{index}: created TAP device {name} (it is removed when the VM ends); \
                     configure the host side, e.g. ip addr add 10.0.0.1/24 dev {name}"
                );
            } else {
                log::info!("eth{index}: using the existing TAP device {name}");
                if !tap.is_up() {
                    log::warn!(
                        "eth{index}: TAP device {name} is down, so no frames pass; bring it up: \
                         ip link set {name} up"
                    );
                }
            }
            tap
        }
        NetBackend::Bridge { bridge, tap } => {
            let name = tap
                .clone()
                .unwrap_or_else(|| derived_tap_name(&std::process::id().to_string(), index));
            // Check the bridge before making a TAP that would only be thrown away.
            if !host_if::exists(bridge) {
                return Err(err(&host_if::BridgeError::Missing(bridge.clone())));
            }
            if host_if::exists(&name) {
                return Err(err(&format!(
                    "an interface named {name} exists already (another VM's TAP, or a \
                     leftover); stop that VM or delete it (ip link del {name})"
                )));
            }
            let tap = Tap::open(&name).map_err(|e| err(&e))?;
            host_if::add_to_bridge(bridge, &name).map_err(|e| err(&e))?;
            tap.set_up().map_err(|e| err(&e))?;
            log::info!(
                "eth{index}: TAP device {name} on bridge {bridge} (removed when the VM ends)"
            );
            tap
        }
    };
    let mac = net
        .mac
        .unwrap_or_else(|| MacAddr::derived(&format!("tap:{}", tap.name())));
    log::info!("eth{index}: MAC address {mac}");
    Ok(Net::new(tap, mac.0))
}
