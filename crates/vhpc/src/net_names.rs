//! Default TAP names and MAC addresses for `--net`, fixed when a VM is configured so they
//! are in its config (and `config.json`) from the start.
//!
//! - `vhpc vm start NAME`: a bridge interface's TAP is `vhpc-NAME-N` (see
//!   [`derived_tap_name`]); the MAC comes from the VM's name and N, so a VM keeps its
//!   addresses across restarts.
//! - `vhpc run`: there is no VM name, so a bridge interface's TAP is `vhpc-PID-N` and the MAC
//!   comes from the TAP's name (in the VMM): `tap=NAME` keeps its MAC from run to run,
//!   `bridge=` gets a new one per run, unique among the VMs running on the host. Give
//!   `mac=` for a fixed address.

use vhpc_api::{MacAddr, NetBackend, NetConfig, derived_tap_name};

/// Fills in the TAP name of bridge interfaces from `owner`.
fn with_tap_names(owner: &str, nets: &[NetConfig]) -> Vec<NetConfig> {
    nets.iter()
        .enumerate()
        .map(|(index, net)| {
            let mut net = net.clone();
            if let NetBackend::Bridge {
                tap: tap @ None, ..
            } = &mut net.backend
            {
                *tap = Some(derived_tap_name(owner, index));
            }
            net
        })
        .collect()
}

/// The interfaces of long-running VM `name`.
pub fn for_vm(name: &str, nets: &[NetConfig]) -> Vec<NetConfig> {
    let mut nets = with_tap_names(name, nets);
    for (index, net) in nets.iter_mut().enumerate() {
        net.mac = net
            .mac
            .or_else(|| Some(MacAddr::derived(&format!("vm:{name}:{index}"))));
    }
    nets
}

/// The interfaces of a VM arriving as `name` (live migration): bridge interfaces get TAPs
/// named after `name`; MACs and explicit TAPs stay as the source had them.
pub fn retap_for_vm(name: &str, nets: &[NetConfig]) -> Vec<NetConfig> {
    nets.iter()
        .enumerate()
        .map(|(index, net)| {
            let mut net = net.clone();
            if let NetBackend::Bridge { tap, .. } = &mut net.backend {
                *tap = Some(derived_tap_name(name, index));
            }
            net
        })
        .collect()
}

/// The interfaces of a `vhpc run` VM (this process is its VMM).
pub fn for_run(nets: &[NetConfig]) -> Vec<NetConfig> {
    with_tap_names(&std::process::id().to_string(), nets)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn vm_interfaces_get_stable_names_and_macs() {
        let nets: Vec<NetConfig> = ["bridge=br0", "tap=t9", "bridge=br1,mac=52:54:00:00:00:09"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let a = for_vm("a", &nets);
        assert_eq!(a, for_vm("a", &nets), "stable");
        assert_eq!(a[0].tap_name(), Some("vhpc-a-0"));
        let moved = retap_for_vm("b", &a);
        assert_eq!(
            moved[0].tap_name(),
            Some("vhpc-b-0"),
            "a bridge TAP follows the name"
        );
        assert_eq!(moved[1].tap_name(), Some("t9"), "an explicit TAP stays");
        assert_eq!(
            moved.iter().map(|n| n.mac).collect::<Vec<_>>(),
            a.iter().map(|n| n.mac).collect::<Vec<_>>(),
            "MACs stay"
        );
        assert_eq!(a[1].tap_name(), Some("t9"));
        assert_eq!(a[2].tap_name(), Some("vhpc-a-2"));
        assert_eq!(a[2].mac.unwrap().to_string(), "52:54:00:00:00:09");
        assert_ne!(a[0].mac, a[1].mac);
        let b = for_vm("b", &nets);
        assert_ne!(a[0].mac, b[0].mac, "another VM, another address");
        vhpc_api::net_config::validate_all(&a).unwrap();
    }
}
