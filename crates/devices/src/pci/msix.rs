//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and how a vector
//! reaches the guest without the VMM in the path.
//!
//! Each vector has an eventfd the VMM registered as a KVM irqfd for its own GSI. When the
//! guest programs a table entry (address, data), the device asks the [`MsiRouter`] (the VMM,
//! with KVM_SET_GSI_ROUTING) to point that GSI at the message. Raising a vector is then one
//! eventfd write, from whatever thread does the device's work; a masked vector is only marked
//! pending and fires when unmasked.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// The PCI capability ID of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable and function mask, the bits the guest may write.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// An MSI message: what the device writes where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Points interrupt routes at MSI messages; the VMM implements it with KVM.
pub trait MsiRouter: Send + Sync {
    /// From now on, signalling `gsi` delivers `message`.
    fn route(&self, gsi: u32, message: MsiMessage) -> std::io::Result<()>;
}

/// The MSI-X state of one device, as saved in its checkpoint component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixStateV1 {
    /// [address low, address high, data, vector control] per vector.
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

struct State {
    /// [address low, address high, data, vector control] per vector.
    entries: Vec<[u32; 4]>,
    pending: Vec<bool>,
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
    route_error_logged: bool,
}

/// The MSI-X vectors of one device, shared by its register handling (vCPU threads) and its
/// worker thread (which raises them).
pub struct MsixVectors {
    state: Mutex<State>,
    irqfds: Vec<EventFd>,
    gsis: Vec<u32>,
    router: Arc<dyn MsiRouter>,
}

impl MsixVectors {
    /// One vector per (irqfd, GSI) pair; every vector starts masked, MSI-X disabled.
    pub fn new(irqfds: Vec<EventFd>, gsis: Vec<u32>, router: Arc<dyn MsiRouter>) -> Self {
        let n = irqfds.len().min(gsis.len());
        MsixVectors {
            state: Mutex::new(State {
                entries: vec![[0, 0, 0, VECTOR_MASKED]; n],
                pending: vec![false; n],
                routed: vec![None; n],
                enabled: false,
                function_masked: false,
                route_error_logged: false,
            }),
            irqfds,
            gsis,
            router,
        }
    }

    pub fn count(&self) -> u16 {
        self.lock().entries.len() as u16
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The capability body after ID and next pointer: message control (table size - 1),
    /// table offset/BIR, PBA offset/BIR (both in BAR0). And which of its bits are writable.
    pub fn capability(count: u16, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(count.saturating_sub(1)).to_le_bytes());
        body[2..6].copy_from_slice(&table_offset.to_le_bytes());
        body[6..10].copy_from_slice(&pba_offset.to_le_bytes());
        let mut writable = [0u8; 10];
        writable[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, writable)
    }

    /// The guest changed the message control word.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.fire_pending(&mut s);
    }

    /// A guest read of the table; only aligned dword and qword accesses mean anything.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let s = self.lock();
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let entry = (at / ENTRY_SIZE) as usize;
            let word = ((at % ENTRY_SIZE) / 4) as usize;
            if let (Some(e), 4, 0) = (s.entries.get(entry), chunk.len(), at % 4) {
                chunk.copy_from_slice(&e[word].to_le_bytes());
            }
        }
    }

    /// A guest write to the table.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let entry = (at / ENTRY_SIZE) as usize;
            let word = ((at % ENTRY_SIZE) / 4) as usize;
            if chunk.len() != 4 || !at.is_multiple_of(4) || entry >= s.entries.len() {
                continue;
            }
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(chunk);
            s.entries[entry][word] = u32::from_le_bytes(bytes);
            if word < 3 {
                self.update_route(&mut s, entry);
            }
        }
        self.fire_pending(&mut s);
    }

    /// A guest read of the pending-bit array.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *byte = (0..8)
                .filter(|b| s.pending.get(first + b).copied().unwrap_or(false))
                .fold(0, |acc, b| acc | (1 << b));
        }
    }

    fn update_route(&self, s: &mut State, entry: usize) {
        let e = s.entries[entry];
        let message = MsiMessage {
            address: u64::from(e[1]) << 32 | u64::from(e[0]),
            data: e[2],
        };
        if s.routed[entry] == Some(message) {
            return;
        }
        match self.router.route(self.gsis[entry], message) {
            Ok(()) => s.routed[entry] = Some(message),
            Err(e) if !s.route_error_logged => {
                s.route_error_logged = true;
                log::warn!("cannot route MSI-X vector {entry}: {e}; its interrupts are lost");
            }
            Err(_) => {}
        }
    }

    fn deliverable(s: &State, vector: usize) -> bool {
        s.enabled && !s.function_masked && s.entries[vector][3] & VECTOR_MASKED == 0
    }

    fn fire_pending(&self, s: &mut State) {
        for v in 0..s.entries.len() {
            if s.pending[v] && Self::deliverable(s, v) {
                s.pending[v] = false;
                self.signal(v);
            }
        }
    }

    fn signal(&self, vector: usize) {
        if let Err(e) = self.irqfds[vector].write(1) {
            log::debug!("MSI-X vector {vector}: irqfd write failed: {e}");
        }
    }

    /// Raises `vector` (a queue's or the config vector); 0xffff (no vector) and unknown
    /// vectors are ignored, a masked vector becomes pending.
    pub fn trigger(&self, vector: u16) {
        let mut s = self.lock();
        let v = usize::from(vector);
        if v >= s.entries.len() || !s.enabled {
            return;
        }
        if Self::deliverable(&s, v) {
            self.signal(v);
        } else {
            s.pending[v] = true;
        }
    }

    /// The table, pending bits and enable/mask state.
    pub fn save(&self) -> MsixStateV1 {
        let s = self.lock();
        MsixStateV1 {
            entries: s.entries.clone(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_masked: s.function_masked,
        }
    }

    /// Puts a saved table back and routes every programmed vector's GSI to its message
    /// again (the new VM's KVM routing table starts empty); a vector that was pending and
    /// is deliverable now fires.
    pub fn restore(&self, saved: MsixStateV1) -> Result<(), String> {
        let mut s = self.lock();
        let n = s.entries.len();
        if saved.entries.len() != n || saved.pending.len() != n {
            return Err(format!(
                "{} MSI-X vectors and {} pending bits saved, the device has {n}",
                saved.entries.len(),
                saved.pending.len()
            ));
        }
        s.entries = saved.entries;
        s.pending = saved.pending;
        s.enabled = saved.enabled;
        s.function_masked = saved.function_masked;
        s.routed.fill(None);
        for entry in 0..n {
            let e = s.entries[entry];
            if e[0] != 0 || e[1] != 0 || e[2] != 0 {
                self.update_route(&mut s, entry);
            }
        }
        if s.route_error_logged {
            return Err("KVM refused an MSI route".into());
        }
        self.fire_pending(&mut s);
        Ok(())
    }

    /// Back to power-on state (device reset): MSI-X off, every vector masked, nothing pending.
    /// Routes stay: they are rewritten when the guest programs the table again.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.enabled = false;
        s.function_masked = false;
        let s = &mut *s;
        s.entries.fill([0, 0, 0, VECTOR_MASKED]);
        s.pending.fill(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, MsiMessage)>>);
    impl MsiRouter for Routes {
        fn route(&self, gsi: u32, message: MsiMessage) -> std::io::Result<()> {
            self.0.lock().expect("lock").push((gsi, message));
            Ok(())
        }
    }

    fn vectors(n: usize) -> (MsixVectors, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let fds = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let gsis = (0..n as u32).map(|i| 24 + i).collect();
        (MsixVectors::new(fds, gsis, routes.clone()), routes)
    }

    fn fired(v: &MsixVectors, vector: usize) -> bool {
        v.irqfds[vector].read().is_ok()
    }

    #[test]
    fn programming_an_entry_routes_its_gsi() {
        let (v, routes) = vectors(2);
        v.table_write(16, &0xfee0_0000u32.to_le_bytes());
        v.table_write(24, &0x4041u32.to_le_bytes());
        let routes = routes.0.lock().expect("lock").clone();
        assert_eq!(
            routes.last(),
            Some(&(
                25,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x4041
                }
            ))
        );
        let mut d = [0u8; 8];
        v.table_read(16, &mut d);
        assert_eq!(d, [0, 0, 0xe0, 0xfe, 0, 0, 0, 0]);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (v, _) = vectors(2);
        v.trigger(1);
        assert!(!fired(&v, 1), "MSI-X disabled: nothing");
        v.set_control(CONTROL_ENABLE);
        v.trigger(1);
        assert!(!fired(&v, 1), "vector masked");
        let mut pba = [0u8; 1];
        v.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        v.table_write(16 + 12, &0u32.to_le_bytes());
        assert!(fired(&v, 1), "pending vector fires on unmask");
        v.trigger(1);
        assert!(fired(&v, 1));
        v.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        v.trigger(1);
        assert!(!fired(&v, 1), "function mask");
        v.set_control(CONTROL_ENABLE);
        assert!(fired(&v, 1));
    }

    #[test]
    fn restore_reroutes_programmed_vectors_and_keeps_pending_bits() {
        let (v, _) = vectors(3);
        v.table_write(16, &0xfee0_1000u32.to_le_bytes());
        v.table_write(24, &0x4042u32.to_le_bytes());
        v.table_write(32 + 12, &0u32.to_le_bytes()); // vector 2 unmasked, never programmed
        v.set_control(CONTROL_ENABLE);
        v.trigger(1); // masked: pending
        let saved = v.save();
        assert_eq!(saved.pending, vec![false, true, false]);

        let (fresh, routes) = vectors(3);
        fresh
            .restore(saved.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fresh.save(), saved);
        let routes = routes.0.lock().expect("lock").clone();
        assert_eq!(
            routes,
            vec![(
                25,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x4042
                }
            )],
            "only the programmed vector is routed again"
        );
        assert!(!fired(&fresh, 1), "still masked: still pending");
        fresh.table_write(16 + 12, &0u32.to_le_bytes());
        assert!(fired(&fresh, 1), "fires on unmask after restore");

        let (small, _) = vectors(2);
        assert!(small.restore(saved).is_err(), "vector count differs");
    }

    #[test]
    fn odd_accesses_and_bad_vectors_are_ignored() {
        let (v, _) = vectors(1);
        v.table_write(2, &[1, 2]);
        v.table_write(1 << 20, &[0xff; 4]);
        let mut d = [0xaau8; 3];
        v.table_read(1, &mut d);
        assert_eq!(d, [0; 3]);
        v.set_control(CONTROL_ENABLE);
        v.trigger(7);
        v.trigger(0xffff);
    }
}
