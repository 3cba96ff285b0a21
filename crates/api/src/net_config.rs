//! A virtio-net interface as the user gives it: `--net tap=NAME[,mac=MAC]` or
//! `--net bridge=BR[,mac=MAC]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Linux interface names have at most 15 bytes (IFNAMSIZ less the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// A unicast Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered address in QEMU's 52:54:00 range, the last three bytes taken
    /// from a hash of `key`: the same key always gives the same address.
    pub fn derived(key: &str) -> MacAddr {
        let [a, b, c, _] = fnv1a(key).to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, a, b, c])
    }
}

/// FNV-1a: tiny, and stable across Rust versions and platforms (unlike DefaultHasher), so
/// derived names and addresses never change under a user.
fn fnv1a(key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The name of the TAP vhpc makes for interface `index` of a VM: `vhpc-<owner>-<index>`,
/// where `owner` is the VM's name (`vhpc vm start`) or the VMM's pid (`vhpc run`). An owner
/// too long for the 15-byte limit keeps its start and gets 4 hex digits of its hash, so two
/// long names with the same start still differ.
pub fn derived_tap_name(owner: &str, index: usize) -> String {
    let suffix = format!("-{index}");
    let budget = MAX_IFNAME_LEN - "vhpc-".len() - suffix.len();
    let owner: String = if owner.len() <= budget {
        owner.to_string()
    } else {
        let keep: String = owner.chars().take(budget.saturating_sub(4)).collect();
        format!("{keep}{:04x}", fnv1a(owner) & 0xffff)
    };
    format!("vhpc-{owner}{suffix}")
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = NetConfigError;

    /// Six hex bytes separated by ':'; unicast (a multicast or all-zero address cannot be an
    /// interface's own).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetConfigError::BadMac(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 == 1 {
            return Err(NetConfigError::MulticastMac(s.to_string()));
        }
        if mac == [0; 6] {
            return Err(NetConfigError::ZeroMac);
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the interface's frames go on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetBackend {
    /// The TAP device `name`: an existing one is used as it is; a missing one is created
    /// (and vanishes when the VM ends).
    Tap { name: String },
    /// A new TAP device attached to bridge `bridge` and brought up, removed when the VM ends.
    /// `tap` is its name: vhpc derives one from the VM (`vhpc-<name or pid>-<index>`).
    Bridge { bridge: String, tap: Option<String> },
}

/// One virtio-net interface (the guest sees them as eth0, eth1, ... in order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// The guest's MAC address; when absent vhpc derives a stable one (see README.md).
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

/// A `--net` the user has to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error(
        "--net needs tap=NAME or bridge=BR, e.g. --net bridge=br0 or --net tap=tap0,mac=52:54:00:12:34:56"
    )]
    NoBackend,
    #[error("--net takes tap=NAME or bridge=BR, not both (bridge= makes its own TAP)")]
    BothBackends,
    #[error("unknown --net option {0:?}: the options are tap=NAME, bridge=BR and mac=MAC")]
    UnknownOption(String),
    #[error("--net option {0:?} needs a value, e.g. {0}=...")]
    NoValue(String),
    #[error("--net option {0} is given twice")]
    Repeated(String),
    #[error(
        "interface name {0:?} is not usable: give 1 to {MAX_IFNAME_LEN} characters, no '/', ':', ',' or whitespace"
    )]
    BadIfName(String),
    #[error("{0:?} is not a MAC address; write six hex bytes, e.g. mac=52:54:00:12:34:56")]
    BadMac(String),
    #[error(
        "{0} is a multicast address (lowest bit of the first byte set); an interface needs a unicast one, e.g. 52:54:00:..."
    )]
    MulticastMac(String),
    #[error("00:00:00:00:00:00 is not a usable MAC address; e.g. mac=52:54:00:12:34:56")]
    ZeroMac,
    #[error("two interfaces have the MAC address {0}; give each its own mac=")]
    DuplicateMac(MacAddr),
    #[error("two interfaces use the TAP device {0}; a TAP can serve one interface only")]
    DuplicateTap(String),
}

/// Checks a Linux interface name (what the kernel's dev_valid_name accepts, minus ',' which
/// would break our own syntax).
pub fn check_ifname(name: &str) -> Result<(), NetConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == ',' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(NetConfigError::BadIfName(name.to_string()))
    }
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    /// `tap=NAME[,mac=MAC]` or `bridge=BR[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut tap, mut bridge, mut mac) = (None, None, None);
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| match item {
                "tap" | "bridge" | "mac" => NetConfigError::NoValue(item.to_string()),
                _ => NetConfigError::UnknownOption(item.to_string()),
            })?;
            let slot = match key {
                "tap" => &mut tap,
                "bridge" => &mut bridge,
                "mac" => &mut mac,
                _ => return Err(NetConfigError::UnknownOption(key.to_string())),
            };
            if value.is_empty() {
                return Err(NetConfigError::NoValue(key.to_string()));
            }
            if slot.replace(value.to_string()).is_some() {
                return Err(NetConfigError::Repeated(key.to_string()));
            }
        }
        let backend = match (tap, bridge) {
            (Some(_), Some(_)) => return Err(NetConfigError::BothBackends),
            (Some(name), None) => NetBackend::Tap { name },
            (None, Some(bridge)) => NetBackend::Bridge { bridge, tap: None },
            (None, None) => return Err(NetConfigError::NoBackend),
        };
        let config = NetConfig {
            backend,
            mac: mac.map(|m| m.parse()).transpose()?,
        };
        config.validate()?;
        Ok(config)
    }
}

impl NetConfig {
    /// Checks the names (a config may also come from JSON).
    pub fn validate(&self) -> Result<(), NetConfigError> {
        match &self.backend {
            NetBackend::Tap { name } => check_ifname(name),
            NetBackend::Bridge { bridge, tap } => {
                check_ifname(bridge)?;
                tap.as_deref().map_or(Ok(()), check_ifname)
            }
        }
    }

    /// The TAP device's name, once known (for bridge= it is set when the VM is configured).
    pub fn tap_name(&self) -> Option<&str> {
        match &self.backend {
            NetBackend::Tap { name } => Some(name),
            NetBackend::Bridge { tap, .. } => tap.as_deref(),
        }
    }
}

/// Checks a VM's interfaces together: each valid, no MAC or TAP name used twice.
pub fn validate_all(nets: &[NetConfig]) -> Result<(), NetConfigError> {
    let mut macs = std::collections::HashSet::new();
    let mut taps = std::collections::HashSet::new();
    for net in nets {
        net.validate()?;
        if let Some(mac) = net.mac
            && !macs.insert(mac)
        {
            return Err(NetConfigError::DuplicateMac(mac));
        }
        if let Some(tap) = net.tap_name()
            && !taps.insert(tap.to_string())
        {
            return Err(NetConfigError::DuplicateTap(tap.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap_bridge_and_mac() {
        let n: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                backend: NetBackend::Tap {
                    name: "tap0".into()
                },
                mac: None
            }
        );
        let n: NetConfig = "bridge=br0,mac=52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(
            n.backend,
            NetBackend::Bridge {
                bridge: "br0".into(),
                tap: None
            }
        );
        assert_eq!(n.mac, Some(MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 1])));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:ab:cd:01");
    }

    #[test]
    fn bad_specs_say_what_to_fix() {
        let err = |s: &str| s.parse::<NetConfig>().unwrap_err();
        assert_eq!(err("tap=a,bridge=b"), NetConfigError::BothBackends);
        assert_eq!(err(""), NetConfigError::NoBackend);
        assert_eq!(err("mac=52:54:00:00:00:01"), NetConfigError::NoBackend);
        assert_eq!(
            err("tap=a,vlan=3"),
            NetConfigError::UnknownOption("vlan".into())
        );
        assert_eq!(
            err("tap=a,foo"),
            NetConfigError::UnknownOption("foo".into())
        );
        assert_eq!(err("tap="), NetConfigError::NoValue("tap".into()));
        assert_eq!(err("bridge"), NetConfigError::NoValue("bridge".into()));
        assert_eq!(err("tap=a,tap=b"), NetConfigError::Repeated("tap".into()));
        assert_eq!(
            err("tap=a-very-long-interface"),
            NetConfigError::BadIfName("a-very-long-interface".into())
        );
        assert_eq!(err("tap=a/b"), NetConfigError::BadIfName("a/b".into()));
        for mac in [
            "52:54:00:00:00",
            "52:54:00:00:00:01:02",
            "5254.0000.0001",
            "52:54:00:0g:00:01",
            "52:54:00:0:00:01",
        ] {
            assert_eq!(
                err(&format!("tap=a,mac={mac}")),
                NetConfigError::BadMac(mac.into()),
                "{mac}"
            );
        }
        assert!(matches!(
            err("tap=a,mac=01:00:5e:00:00:01"),
            NetConfigError::MulticastMac(_)
        ));
        assert_eq!(err("tap=a,mac=00:00:00:00:00:00"), NetConfigError::ZeroMac);
        let msg = err("tap=a,mac=xyz").to_string();
        assert!(msg.contains("mac=52:54:00:12:34:56"), "{msg}");
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_differ() {
        let a = MacAddr::derived("vm:a:0");
        assert_eq!(a, MacAddr::derived("vm:a:0"));
        assert_ne!(a, MacAddr::derived("vm:a:1"));
        assert_ne!(a, MacAddr::derived("vm:b:0"));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        // Pinned: a change here changes every VM's default address.
        assert_eq!(MacAddr::derived("").to_string(), "52:54:00:81:1c:9d");
    }

    #[test]
    fn derived_tap_names_fit_and_differ() {
        assert_eq!(derived_tap_name("a", 0), "vhpc-a-0");
        assert_eq!(derived_tap_name("4242", 1), "vhpc-4242-1");
        let long1 = derived_tap_name("compute-node-017", 0);
        let long2 = derived_tap_name("compute-node-018", 0);
        assert_ne!(long1, long2);
        for name in [
            &long1,
            &long2,
            &derived_tap_name("x".repeat(40).as_str(), 12),
        ] {
            assert!(name.len() <= MAX_IFNAME_LEN, "{name}");
            assert_eq!(check_ifname(name), Ok(()));
        }
        assert!(long1.starts_with("vhpc-comp"), "{long1}");
    }

    #[test]
    fn duplicates_across_interfaces_are_refused() {
        let a: NetConfig = "tap=t0,mac=52:54:00:00:00:01".parse().unwrap();
        let b: NetConfig = "tap=t1,mac=52:54:00:00:00:01".parse().unwrap();
        assert!(matches!(
            validate_all(&[a.clone(), b]),
            Err(NetConfigError::DuplicateMac(_))
        ));
        let c: NetConfig = "tap=t0".parse().unwrap();
        assert_eq!(
            validate_all(&[a, c]),
            Err(NetConfigError::DuplicateTap("t0".into()))
        );
    }

    #[test]
    fn json_round_trip() {
        let n: NetConfig = "bridge=br0,mac=52:54:00:00:00:07".parse().unwrap();
        let json = serde_json::to_string(&n).unwrap();
        assert!(json.contains("\"52:54:00:00:00:07\""), "{json}");
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), n);
        let bad = json.replace("52:54:00:00:00:07", "ff:ff:ff:ff:ff:ff");
        assert!(serde_json::from_str::<NetConfig>(&bad).is_err());
    }
}
