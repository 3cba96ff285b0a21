//! The virtio-net device's own state in checkpoints and migrations, and the announcement a
//! moved VM makes on its new TAP.
//!
//! What the guest sees of the device besides the transport (queues, features, MSI-X, saved by
//! the virtio-pci transport) is its MAC address; the TAP is the host's and is opened anew by
//! the restoring VMM from the VM's config (same MAC). After a restore the device sends one
//! RARP frame with the guest's MAC from its new TAP, as QEMU's self-announce does, so that
//! bridges and switches learn at once where the MAC now lives; the guest keeps its IP
//! addresses and connections, and peers reach it through the new port.

use serde::{Deserialize, Serialize};

use super::device::Net;
use crate::persist::{Persist, PersistError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStateV1 {
    pub mac: [u8; 6],
}

impl Persist for Net {
    type State = NetStateV1;
    const VERSION: u32 = 1;
    const NAME: &'static str = "virtio-net";

    fn save(&self) -> Result<NetStateV1, PersistError> {
        Ok(NetStateV1 { mac: self.mac() })
    }

    fn restore(&mut self, s: NetStateV1) -> Result<(), PersistError> {
        if s.mac != self.mac() {
            return Err(PersistError::Mismatch {
                device: Self::NAME,
                detail: format!(
                    "the saved interface has MAC {}, this one {}; restore with the VM's own config",
                    format_mac(&s.mac),
                    format_mac(&self.mac())
                ),
            });
        }
        self.announce_on_activate();
        Ok(())
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Bytes of the virtio-net header the TAP expects before every frame (TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = 12;

/// A RARP "reverse request" broadcast from `mac` (ethertype 0x8035), padded to the 60-byte
/// Ethernet minimum, behind an all-zero vnet header (no offloads).
pub fn announcement(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]); // destination: broadcast
    f.extend_from_slice(mac); // source
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]); // Ethernet/IPv4, op 3
    f.extend_from_slice(mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address: unknown
    f.extend_from_slice(mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address: unknown
    f.resize(VNET_HDR_LEN + 60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_from_the_mac() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = announcement(&mac);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        assert!(f[..VNET_HDR_LEN].iter().all(|&b| b == 0));
        let eth = &f[VNET_HDR_LEN..];
        assert_eq!(&eth[0..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0x00, 0x03], "reverse request");
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[32..38], &mac);
    }
}
