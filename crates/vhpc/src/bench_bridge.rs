//! The host network of the network benchmarks (`vhpc bench net`, `vhpc bench migrate`): a
//! Linux bridge, and persistent TAPs on it for the QEMU guests (vhpc makes its own TAPs with
//! `--net bridge=`). Everything made here is removed when the [`BenchBridge`] is dropped, so
//! a failed run leaves the emulated host clean for the next one. Uses busybox `brctl`,
//! `tunctl` and `ip`, as the lab has them.

use crate::bench_measure::host_sh;

/// A bridge and the TAPs added to it; all removed on drop.
pub struct BenchBridge {
    name: &'static str,
    taps: Vec<String>,
}

impl BenchBridge {
    /// Creates bridge `name` and brings it up. `mac` fixes its MAC address: by default a Linux
    /// bridge takes the lowest MAC of its ports, which changes when a port goes (a migration
    /// replaces the source's TAP with the destination's), and a guest's ARP entry for the
    /// host would then point at a MAC nobody has. `host_ip` (with its /prefix) makes the host
    /// reachable on the bridge.
    pub fn create(
        name: &'static str,
        mac: Option<&str>,
        host_ip: Option<&str>,
    ) -> anyhow::Result<Self> {
        host_sh(&format!("brctl addbr {name}"))?;
        let bridge = BenchBridge {
            name,
            taps: Vec::new(),
        };
        if let Some(mac) = mac {
            host_sh(&format!("ip link set {name} address {mac}"))?;
        }
        if let Some(ip) = host_ip {
            host_sh(&format!("ip addr add {ip} dev {name}"))?;
        }
        host_sh(&format!("ip link set {name} up"))?;
        Ok(bridge)
    }

    /// Creates persistent TAP `tap` (for a QEMU guest's `-netdev tap,ifname=`) on the bridge.
    pub fn add_tap(&mut self, tap: &str) -> anyhow::Result<()> {
        host_sh(&format!("tunctl -t {tap} > /dev/null"))?;
        self.taps.push(tap.to_owned());
        host_sh(&format!(
            "brctl addif {} {tap} && ip link set {tap} up",
            self.name
        ))
    }

    /// Removes TAP `tap` (one [`BenchBridge::add_tap`] made).
    pub fn remove_tap(&mut self, tap: &str) {
        if let Some(i) = self.taps.iter().position(|t| t == tap) {
            self.taps.remove(i);
            let _ = host_sh(&format!("tunctl -d {tap} > /dev/null"));
        }
    }
}

impl Drop for BenchBridge {
    fn drop(&mut self) {
        for tap in std::mem::take(&mut self.taps) {
            let _ = host_sh(&format!("tunctl -d {tap} > /dev/null"));
        }
        let _ = host_sh(&format!(
            "ip link set {0} down && brctl delbr {0}",
            self.name
        ));
    }
}
