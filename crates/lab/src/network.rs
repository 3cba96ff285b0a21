//! The lab network: `vhpc lab run --hosts N` joins N emulated hosts on one Ethernet segment.
//!
//! Host K is `hostK` with address 10.0.2.(10+K)/24 (host1 = 10.0.2.11, host2 = 10.0.2.12, ...)
//! on eth0 (virtio-net). The segment is a star of point-to-point UDP links on 127.0.0.1 (QEMU
//! `-netdev dgram`), all ending in a hub inside host 1's QEMU (`-netdev hubport`), which
//! forwards every frame to every other port: any host reaches any other, no root, no bridge,
//! and nothing leaves this machine's loopback.

use std::net::UdpSocket;

use crate::LabError;

/// Most hosts one lab runs (each is a QEMU TCG process on a 2-core machine).
pub const MAX_HOSTS: u32 = 8;
/// TCP port of the command service every host runs (`vhpc lab on K -- CMD`).
pub const COMMAND_PORT: u16 = 7070;

/// The address of host `k` (1-based).
pub fn host_ip(k: u32) -> String {
    format!("10.0.2.{}", 10 + k)
}

/// The hostname of host `k`.
pub fn host_name(k: u32) -> String {
    format!("host{k}")
}

fn mac(k: u32) -> String {
    format!("52:54:00:00:02:{:02x}", 10 + k)
}

/// The UDP ports of one lab's links.
#[derive(Debug, Clone)]
pub struct LabNetwork {
    hosts: u32,
    base_port: u16,
}

impl LabNetwork {
    /// A network for `hosts` hosts, on UDP ports found free on 127.0.0.1 now.
    pub fn new(hosts: u32) -> Result<Self, LabError> {
        if !(1..=MAX_HOSTS).contains(&hosts) {
            return Err(LabError::Hosts(hosts));
        }
        let ports_needed = 2 * u16::try_from(hosts).unwrap_or(1) + 2;
        let start = 20_000 + (std::process::id() % 20_000) as u16;
        let base_port = (0..200u16)
            .map(|i| start.wrapping_add(i * 32) % 40_000 + 20_000)
            .find(|&base| (0..ports_needed).all(|p| udp_port_free(base + p)))
            .ok_or(LabError::NoPorts)?;
        Ok(Self { hosts, base_port })
    }

    pub fn hosts(&self) -> u32 {
        self.hosts
    }

    /// (host 1's end, host k's end) of the link between host 1 and host k.
    fn link_ports(&self, k: u32) -> (u16, u16) {
        let at = self.base_port + 2 * k as u16;
        (at, at + 1)
    }

    /// QEMU arguments that put host `k` on the network (none for a one-host lab).
    pub fn qemu_args(&self, k: u32) -> Vec<String> {
        if self.hosts == 1 {
            return Vec::new();
        }
        let dgram = |id: &str, local: u16, remote: u16| {
            format!(
                "dgram,id={id},local.type=inet,local.host=127.0.0.1,local.port={local},\
                 remote.type=inet,remote.host=127.0.0.1,remote.port={remote}"
            )
        };
        let nic = |netdev: &str| format!("virtio-net-pci,netdev={netdev},mac={}", mac(k));
        let mut args = Vec::new();
        if k == 1 {
            args.extend(["-netdev".into(), "hubport,id=nic,hubid=0".into()]);
            args.extend(["-device".into(), nic("nic")]);
            for peer in 2..=self.hosts {
                let (mine, theirs) = self.link_ports(peer);
                args.extend([
                    "-netdev".into(),
                    dgram(&format!("link{peer}"), mine, theirs),
                ]);
                args.extend([
                    "-netdev".into(),
                    format!("hubport,id=port{peer},hubid=0,netdev=link{peer}"),
                ]);
            }
        } else {
            let (theirs, mine) = self.link_ports(k);
            args.extend(["-netdev".into(), dgram("link", mine, theirs)]);
            args.extend(["-device".into(), nic("link")]);
        }
        args
    }

    /// Shell commands that give host `k` its name, address and /etc/hosts (none for a
    /// one-host lab).
    pub fn setup_script(&self, k: u32) -> String {
        if self.hosts == 1 {
            return String::new();
        }
        let mut hosts_file = String::from("127.0.0.1 localhost\\n");
        for peer in 1..=self.hosts {
            hosts_file.push_str(&format!("{} {}\\n", host_ip(peer), host_name(peer)));
        }
        format!(
            "hostname {name}\nip link set lo up\nip addr add {ip}/24 dev eth0\n\
             ip link set eth0 up\nprintf '{hosts_file}' > /etc/hosts\n",
            name = host_name(k),
            ip = host_ip(k),
        )
    }
}

fn udp_port_free(port: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        assert_eq!(host_ip(1), "10.0.2.11");
        assert_eq!(host_ip(8), "10.0.2.18");
        assert_eq!(host_name(2), "host2");
        assert_eq!(mac(2), "52:54:00:00:02:0c");
    }

    #[test]
    fn host_counts_are_checked() {
        assert!(matches!(LabNetwork::new(0), Err(LabError::Hosts(0))));
        assert!(matches!(LabNetwork::new(9), Err(LabError::Hosts(9))));
        let one = LabNetwork::new(1).unwrap();
        assert!(one.qemu_args(1).is_empty() && one.setup_script(1).is_empty());
    }

    #[test]
    fn a_star_of_links_into_host_ones_hub() {
        let net = LabNetwork {
            hosts: 3,
            base_port: 30_000,
        };
        let h1 = net.qemu_args(1).join(" ");
        assert!(h1.contains("hubport,id=nic,hubid=0"), "{h1}");
        assert!(
            h1.contains("virtio-net-pci,netdev=nic,mac=52:54:00:00:02:0b"),
            "{h1}"
        );
        assert!(h1.contains("id=link2,local.type=inet,local.host=127.0.0.1,local.port=30004,"));
        assert!(h1.contains("remote.port=30005"), "{h1}");
        assert!(h1.contains("hubport,id=port3,hubid=0,netdev=link3"), "{h1}");
        let h3 = net.qemu_args(3).join(" ");
        assert!(
            h3.contains("local.port=30007,") && h3.contains("remote.port=30006"),
            "{h3}"
        );
        assert!(h3.contains("mac=52:54:00:00:02:0d"), "{h3}");
        let setup = net.setup_script(2);
        assert!(setup.contains("hostname host2\n"), "{setup}");
        assert!(
            setup.contains("ip addr add 10.0.2.12/24 dev eth0"),
            "{setup}"
        );
        assert!(setup.contains("10.0.2.13 host3\\n"), "{setup}");
    }

    #[test]
    fn ports_found_are_free() {
        let net = LabNetwork::new(2).unwrap();
        let (a, b) = net.link_ports(2);
        assert!(udp_port_free(a) && udp_port_free(b));
    }
}
