//! The virtio-vsock device's own state in checkpoints and migrations.
//!
//! The transport saves features, queues (with their positions) and MSI-X. What is left that
//! the guest can observe is its CID (the config space) and, indirectly, the host ports of the
//! connections the host opened: both are saved. The connections themselves cannot be: their
//! host ends are Unix sockets of the process that took the checkpoint. A restored device
//! starts with no connection (its muxer is new), and when its queues start it puts
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue: the guest driver then resets every
//! connected socket (listening sockets stay) and reads the CID again, as after a Firecracker
//! snapshot restore. Until the guest has given the event buffer back (it handled the event),
//! the device offers it no new connection: a REQUEST handled before the reset would be reset
//! with the old connections, leaving its host client waiting forever. Guest programs see ECONNRESET and reconnect or accept anew; packets the
//! guest had queued for old connections are answered with RST by the new muxer. New host
//! connections take host ports from where the old process stopped, so none can be mistaken
//! for a connection the guest has not closed yet.

use serde::{Deserialize, Serialize};

use super::device::{MIN_GUEST_CID, Vsock};
use super::muxer::FIRST_LOCAL_PORT;
use crate::persist::{Persist, PersistError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockStateV1 {
    pub guest_cid: u64,
    /// The host port the next host-initiated connection gets.
    pub next_local_port: u32,
}

impl Persist for Vsock {
    type State = VsockStateV1;
    const VERSION: u32 = 1;
    const NAME: &'static str = "virtio-vsock";

    fn save(&self) -> Result<VsockStateV1, PersistError> {
        Ok(VsockStateV1 {
            guest_cid: self.guest_cid(),
            next_local_port: self
                .next_local_port
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Takes the guest's CID from the state (the VM that restores or receives the guest may
    /// have been configured with the default one): the guest knows its CID, and it cannot
    /// change under it.
    fn restore(&mut self, s: VsockStateV1) -> Result<(), PersistError> {
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&s.guest_cid) {
            return Err(PersistError::Decode {
                device: Self::NAME,
                detail: format!("guest CID {} is reserved", s.guest_cid),
            });
        }
        self.set_guest_cid(s.guest_cid);
        self.next_local_port.store(
            s.next_local_port.max(FIRST_LOCAL_PORT),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.reset_on_activate = true;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::persist::DeviceState;
    use crate::virtio::vsock::packet::{HEADER_LEN, Header, OP_REQUEST};
    use crate::virtio::vsock::rings::{EVENT_QUEUE, RX_QUEUE};
    use crate::virtio::{GuestMemory, VirtioBackend};

    const SIZE: u16 = 8;
    const F_WRITE: u16 = 2;
    /// (descriptor table, available ring, used ring) of rx, tx, event.
    const RINGS: [(u64, u64, u64); 3] = [
        (0x0, 0x1000, 0x2000),
        (0x3000, 0x4000, 0x5000),
        (0x6000, 0x7000, 0x8000),
    ];
    const BUFS: u64 = 0x10000;

    struct Rings {
        mem: GuestMemory,
        queues: Vec<Queue>,
        avail: [u16; 3],
    }

    impl Rings {
        fn new() -> Rings {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
            let queues = RINGS
                .iter()
                .map(|&(desc, avail, used)| {
                    let mut q = Queue::new(SIZE).unwrap();
                    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
                    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
                    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
                    q.set_ready(true);
                    q
                })
                .collect();
            Rings {
                mem,
                queues,
                avail: [0; 3],
            }
        }

        /// Posts one buffer of `len` bytes (0xaa-filled) on `queue`; returns its address.
        fn post(&mut self, queue: usize, len: u32, flags: u16) -> u64 {
            let i = self.avail[queue];
            let addr = BUFS + 0x2000 * (queue as u64 * u64::from(SIZE) + u64::from(i));
            self.mem
                .write_slice(&vec![0xaa; len as usize], GuestAddress(addr))
                .unwrap();
            let d = RINGS[queue].0 + 16 * u64::from(i % SIZE);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
            let avail = RINGS[queue].1;
            self.mem
                .write_obj(i % SIZE, GuestAddress(avail + 4 + 2 * u64::from(i % SIZE)))
                .unwrap();
            self.avail[queue] = i + 1;
            self.mem
                .write_obj(self.avail[queue], GuestAddress(avail + 2))
                .unwrap();
            addr
        }

        /// The used ring of `queue`: (idx, [(id, len)]).
        fn used(&self, queue: usize) -> (u16, Vec<(u32, u32)>) {
            let used = RINGS[queue].2;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            let entries = (0..idx)
                .map(|i| {
                    let at = used + 4 + 8 * u64::from(i % SIZE);
                    (
                        self.mem.read_obj(GuestAddress(at)).unwrap(),
                        self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                    )
                })
                .collect();
            (idx, entries)
        }
    }

    fn device(cid: u64) -> (tempfile::TempDir, Vsock) {
        let dir = tempfile::tempdir().unwrap();
        let dev = Vsock::new(cid, &dir.path().join("v.sock")).unwrap();
        (dir, dev)
    }

    fn restored(state: &VsockStateV1) -> (tempfile::TempDir, Vsock) {
        let (dir, mut dev) = device(3);
        let bytes = crate::persist::encode::<Vsock>(state).unwrap();
        dev.restore_state(Vsock::VERSION, &bytes).unwrap();
        (dir, dev)
    }

    fn config_cid(dev: &Vsock) -> u64 {
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn the_cid_and_the_next_host_port_round_trip_and_the_cid_wins_over_the_config() {
        let (_d, dev) = device(42);
        dev.next_local_port
            .store(FIRST_LOCAL_PORT + 7, std::sync::atomic::Ordering::Relaxed);
        let saved = dev.save().unwrap();
        assert_eq!(
            saved,
            VsockStateV1 {
                guest_cid: 42,
                next_local_port: FIRST_LOCAL_PORT + 7
            }
        );
        let (_d2, dev2) = restored(&saved);
        assert_eq!(config_cid(&dev2), 42, "the guest keeps its CID");
        assert_eq!(dev2.save().unwrap(), saved);
    }

    #[test]
    fn a_crafted_state_is_an_error_not_a_panic() {
        let (_d, mut dev) = device(3);
        for cid in [0, 2, u64::from(u32::MAX), u64::MAX] {
            let bytes = crate::persist::encode::<Vsock>(&VsockStateV1 {
                guest_cid: cid,
                next_local_port: 0,
            })
            .unwrap();
            assert!(dev.restore_state(1, &bytes).is_err(), "CID {cid}");
        }
        assert!(dev.restore_state(1, &[0xff; 3]).is_err());
        assert!(dev.restore_state(2, &[]).is_err(), "unknown version");
        assert_eq!(config_cid(&dev), 3, "nothing changed");
        assert!(!dev.reset_on_activate);
        // A port below the host range restores as the range's start.
        let (_d2, dev2) = restored(&VsockStateV1 {
            guest_cid: 5,
            next_local_port: 9,
        });
        assert_eq!(dev2.save().unwrap().next_local_port, FIRST_LOCAL_PORT);
    }

    #[test]
    fn a_restored_device_sends_one_transport_reset_when_its_queues_start() {
        let (_d, mut dev) = restored(&VsockStateV1 {
            guest_cid: 3,
            next_local_port: FIRST_LOCAL_PORT,
        });
        let mut rings = Rings::new();
        let mut handler = dev.activate(0).unwrap();
        // No event buffer yet: the event waits.
        let used = handler
            .process_backend(&mut rings.queues, &rings.mem)
            .unwrap();
        assert_eq!(used & (1 << EVENT_QUEUE), 0);
        assert_eq!(rings.used(EVENT_QUEUE).0, 0);
        // A buffer too small and a read-only one are returned unused; the next one gets it.
        rings.post(EVENT_QUEUE, 2, F_WRITE);
        rings.post(EVENT_QUEUE, 8, 0);
        let good = rings.post(EVENT_QUEUE, 8, F_WRITE);
        rings.post(EVENT_QUEUE, 8, F_WRITE);
        let used = handler
            .process_backend(&mut rings.queues, &rings.mem)
            .unwrap();
        assert_ne!(
            used & (1 << EVENT_QUEUE),
            0,
            "the event queue's vector fires"
        );
        assert_eq!(rings.used(EVENT_QUEUE), (3, vec![(0, 0), (1, 0), (2, 4)]));
        let mut event = [0u8; 8];
        rings
            .mem
            .read_slice(&mut event, GuestAddress(good))
            .unwrap();
        assert_eq!(
            event,
            [0, 0, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa],
            "id 0 = TRANSPORT_RESET"
        );
        // Only once; its interrupt is raised again until the guest gives a buffer back.
        let used = handler
            .process_backend(&mut rings.queues, &rings.mem)
            .unwrap();
        assert_ne!(used & (1 << EVENT_QUEUE), 0, "interrupt again");
        assert_eq!(rings.used(EVENT_QUEUE).0, 3);
        rings.post(EVENT_QUEUE, 8, F_WRITE);
        let used = handler
            .process_backend(&mut rings.queues, &rings.mem)
            .unwrap();
        assert_eq!(used & (1 << EVENT_QUEUE), 0, "the guest answered");
        assert_eq!(rings.used(EVENT_QUEUE).0, 3, "no second event");
        // The next activation (a driver reset) owes the guest nothing.
        let mut rings = Rings::new();
        rings.post(EVENT_QUEUE, 8, F_WRITE);
        let mut handler = dev.activate(0).unwrap();
        handler
            .process_backend(&mut rings.queues, &rings.mem)
            .unwrap();
        assert_eq!(rings.used(EVENT_QUEUE).0, 0);
    }

    #[test]
    fn a_booted_device_sends_no_transport_reset() {
        let (_d, mut dev) = device(3);
        let mut rings = Rings::new();
        rings.post(EVENT_QUEUE, 8, F_WRITE);
        let mut handler = dev.activate(0).unwrap();
        let used = handler
            .process_backend(&mut rings.queues, &rings.mem)
            .unwrap();
        assert_eq!(used, 0);
        assert_eq!(rings.used(EVENT_QUEUE).0, 0);
    }

    #[test]
    fn host_connections_after_a_restore_take_ports_after_the_saved_ones() {
        let (dir, mut dev) = restored(&VsockStateV1 {
            guest_cid: 9,
            next_local_port: FIRST_LOCAL_PORT + 100,
        });
        let mut rings = Rings::new();
        rings.post(EVENT_QUEUE, 4, F_WRITE);
        let rx = rings.post(RX_QUEUE, 0x1000, F_WRITE);
        let mut handler = dev.activate(0).unwrap();
        let mut client = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        // Until the guest gave its event buffer back (it handled the reset), the request
        // is held: it would be reset with the old connections.
        for _ in 0..20 {
            handler
                .process_backend(&mut rings.queues, &rings.mem)
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            rings.used(EVENT_QUEUE).1,
            vec![(0, 4)],
            "the reset went out"
        );
        assert_eq!(
            rings.used(RX_QUEUE).0,
            0,
            "no request before the guest is ready"
        );
        rings.post(EVENT_QUEUE, 4, F_WRITE);
        let mut request = None;
        for _ in 0..100 {
            handler
                .process_backend(&mut rings.queues, &rings.mem)
                .unwrap();
            if rings.used(RX_QUEUE).0 == 1 {
                let mut h = [0u8; HEADER_LEN];
                rings.mem.read_slice(&mut h, GuestAddress(rx)).unwrap();
                request = Some(Header::parse(&h));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let h = request.expect("the connection request reached the guest");
        assert_eq!(h.op, OP_REQUEST);
        assert_eq!((h.dst_cid, h.dst_port), (9, 1024), "to the saved CID");
        assert_eq!(h.src_port, FIRST_LOCAL_PORT + 100);
        assert_eq!(dev.save().unwrap().next_local_port, FIRST_LOCAL_PORT + 101);
        assert_eq!(
            rings.used(EVENT_QUEUE).1,
            vec![(0, 4)],
            "and the reset came too"
        );
        // The client is still waiting for the guest's answer (no OK line yet).
        client.set_nonblocking(true).unwrap();
        let mut line = String::new();
        assert!(BufReader::new(&client).read_line(&mut line).is_err());
    }
}
