//! The virtio-pci common configuration structure (virtio 1.x §4.1.4.3): feature negotiation,
//! per-queue setup and the device status, as plain state the transport reads and writes.
//!
//! ```text
//! 0x00 device_feature_select u32   0x14 device_status u8      0x1c queue_enable u16
//! 0x04 device_feature u32 (RO)     0x15 config_generation u8  0x1e queue_notify_off u16 (RO)
//! 0x08 driver_feature_select u32   0x16 queue_select u16      0x20 queue_desc u64
//! 0x0c driver_feature u32          0x18 queue_size u16        0x28 queue_driver u64
//! 0x10 config_msix_vector u16      0x1a queue_msix_vector u16 0x30 queue_device u64
//! 0x12 num_queues u16 (RO)
//! ```

use serde::{Deserialize, Serialize};

use super::{NO_VECTOR, VIRTIO_F_VERSION_1, status};

/// Length of the structure.
pub const COMMON_CFG_LEN: u64 = 0x38;

/// One queue as the driver configured it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub msix_vector: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            ..Default::default()
        }
    }
}

/// The common configuration as saved in a checkpoint (part of `virtio-pci` version 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonConfigStateV1 {
    /// Offered features: checked on restore (the same device must be there).
    pub device_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub config_msix_vector: u16,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueConfigStateV1>,
}

/// One queue's setup as the driver wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigStateV1 {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub msix_vector: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What a write means for the device.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusChange {
    None,
    /// The driver set DRIVER_OK: start the device.
    Activate,
    /// The driver wrote 0 to the status: stop the device and forget its setup.
    Reset,
}

#[derive(Debug)]
pub struct CommonConfig {
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    pub driver_features: u64,
    pub config_msix_vector: u16,
    pub status: u8,
    queue_select: u16,
    pub queues: Vec<QueueConfig>,
    /// Vectors the device has; a larger one reads back as NO_VECTOR.
    msix_count: u16,
}

impl CommonConfig {
    pub fn new(device_features: u64, queue_max_sizes: &[u16], msix_count: u16) -> Self {
        CommonConfig {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueConfig::new(m))
                .collect(),
            msix_count,
        }
    }

    fn reset(&mut self) {
        let fresh = CommonConfig::new(
            self.device_features,
            &self.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
            self.msix_count,
        );
        *self = fresh;
    }

    pub fn save(&self) -> CommonConfigStateV1 {
        CommonConfigStateV1 {
            device_features: self.device_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            config_msix_vector: self.config_msix_vector,
            status: self.status,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueConfigStateV1 {
                    max_size: q.max_size,
                    size: q.size,
                    enabled: q.enabled,
                    msix_vector: q.msix_vector,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                })
                .collect(),
        }
    }

    /// Puts a saved configuration back into a fresh one of the same device: same offered
    /// features, same queues and maximum sizes; vectors within the device's MSI-X table.
    pub fn restore(&mut self, s: CommonConfigStateV1) -> Result<(), String> {
        if s.device_features != self.device_features {
            return Err(format!(
                "features {:#x} saved, the device offers {:#x}",
                s.device_features, self.device_features
            ));
        }
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        let saved_max: Vec<u16> = s.queues.iter().map(|q| q.max_size).collect();
        if max != saved_max {
            return Err(format!(
                "queue sizes {saved_max:?} saved, the device has {max:?}"
            ));
        }
        let vector_ok = |v: u16| v == NO_VECTOR || v < self.msix_count;
        if !vector_ok(s.config_msix_vector) || !s.queues.iter().all(|q| vector_ok(q.msix_vector)) {
            return Err("an MSI-X vector beyond the device's table".into());
        }
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.config_msix_vector = s.config_msix_vector;
        self.status = s.status;
        self.queue_select = s.queue_select;
        self.queues = s
            .queues
            .into_iter()
            .map(|q| QueueConfig {
                max_size: q.max_size,
                size: q.size,
                enabled: q.enabled,
                msix_vector: q.msix_vector,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            })
            .collect();
        Ok(())
    }

    fn queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue, if it exists and may still be configured (not enabled yet).
    fn queue_mut(&mut self) -> Option<&mut QueueConfig> {
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled)
    }

    fn half(value: u64, select: u32) -> u32 {
        match select {
            0 => value as u32,
            1 => (value >> 32) as u32,
            _ => 0,
        }
    }

    /// The value of the register at `offset` for an access of `len` bytes, if there is one.
    fn register(&self, offset: u64, len: usize) -> Option<u64> {
        let q = self.queue();
        let v = match (offset, len) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => u64::from(Self::half(self.device_features, self.device_feature_select)),
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => u64::from(Self::half(self.driver_features, self.driver_feature_select)),
            (0x10, 2) => u64::from(self.config_msix_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => 0,
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => u64::from(q.map_or(0, |q| q.size)),
            (0x1a, 2) => u64::from(q.map_or(NO_VECTOR, |q| q.msix_vector)),
            (0x1c, 2) => u64::from(q.is_some_and(|q| q.enabled)),
            // Queue i is notified at notify_off i times the multiplier.
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20 | 0x28 | 0x30, 4 | 8) | (0x24 | 0x2c | 0x34, 4) => {
                let q = q?;
                let base = offset & !7;
                let full = match base {
                    0x20 => q.desc,
                    0x28 => q.avail,
                    _ => q.used,
                };
                if len == 8 {
                    full
                } else if offset == base {
                    full & 0xffff_ffff
                } else {
                    full >> 32
                }
            }
            _ => return None,
        };
        Some(v)
    }

    /// A guest read; unknown registers and odd sizes read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let v = self.register(offset, data.len()).unwrap_or(0);
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    /// A guest write; returns what the device must do about it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> StatusChange {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(bytes);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if self.status & status::FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return StatusChange::None,
                };
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= (v & 0xffff_ffff) << shift;
            }
            (0x10, 2) => self.config_msix_vector = self.vector(v as u16),
            (0x14, 1) => return self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) => {
                if let Some(q) = self.queue_mut() {
                    q.size = v as u16;
                }
            }
            (0x1a, 2) => {
                let vector = self.vector(v as u16);
                if let Some(q) = self.queue_mut() {
                    q.msix_vector = vector;
                }
            }
            (0x1c, 2) if v == 1 => {
                if let Some(q) = self.queue_mut() {
                    q.enabled = true;
                }
            }
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(4) => {
                if let Some(q) = self.queue_mut() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if data.len() == 8 {
                        *field = v;
                    } else if offset.is_multiple_of(8) {
                        *field = (*field & !0xffff_ffff) | (v & 0xffff_ffff);
                    } else {
                        *field = (*field & 0xffff_ffff) | (v << 32);
                    }
                }
            }
            _ => {}
        }
        StatusChange::None
    }

    fn vector(&self, v: u16) -> u16 {
        if v < self.msix_count { v } else { NO_VECTOR }
    }

    fn write_status(&mut self, new: u8) -> StatusChange {
        if new == 0 {
            self.reset();
            return StatusChange::Reset;
        }
        let old = self.status;
        let mut new = new;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let acceptable = self.driver_features & !self.device_features == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                // The driver reads the status back and gives up (virtio 1.x §3.1.1).
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        let starting = new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0;
        if starting && new & status::FEATURES_OK != 0 {
            StatusChange::Activate
        } else {
            StatusChange::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &CommonConfig, offset: u64, len: usize) -> u64 {
        let mut d = vec![0u8; len];
        c.read(offset, &mut d);
        d.resize(8, 0);
        u64::from_le_bytes(d.try_into().expect("8 bytes"))
    }

    fn write(c: &mut CommonConfig, offset: u64, len: usize, v: u64) -> StatusChange {
        c.write(offset, &v.to_le_bytes()[..len])
    }

    #[test]
    fn feature_negotiation_and_activation() {
        let features = VIRTIO_F_VERSION_1 | 1 << 9;
        let mut c = CommonConfig::new(features, &[128], 2);
        write(&mut c, 0, 4, 1);
        assert_eq!(read(&c, 4, 4), 1);
        write(&mut c, 0, 4, 0);
        assert_eq!(read(&c, 4, 4), 1 << 9);
        write(&mut c, 0x08, 4, 1);
        write(&mut c, 0x0c, 4, 1);
        write(
            &mut c,
            0x14,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        write(&mut c, 0x14, 1, 0x0b);
        assert_eq!(read(&c, 0x14, 1), 0x0b, "FEATURES_OK accepted");
        write(&mut c, 0x1a, 2, 1);
        write(&mut c, 0x20, 4, 0x1000);
        write(&mut c, 0x24, 4, 0x2);
        write(&mut c, 0x28, 8, 0x3000);
        write(&mut c, 0x1c, 2, 1);
        assert_eq!(write(&mut c, 0x14, 1, 0x0f), StatusChange::Activate);
        let q = &c.queues[0];
        assert_eq!((q.desc, q.avail, q.msix_vector), (0x2_0000_1000, 0x3000, 1));
        assert_eq!(read(&c, 0x24, 4), 2);
        // Enabled queues cannot be changed; reset forgets everything.
        write(&mut c, 0x20, 4, 0);
        assert_eq!(c.queues[0].desc, 0x2_0000_1000);
        assert_eq!(write(&mut c, 0x14, 1, 0), StatusChange::Reset);
        assert_eq!(c.queues[0], QueueConfig::new(128));
        assert_eq!(c.driver_features, 0);
    }

    #[test]
    fn features_the_device_lacks_are_refused() {
        let mut c = CommonConfig::new(VIRTIO_F_VERSION_1, &[16], 1);
        write(&mut c, 0x0c, 4, 1 << 5);
        write(&mut c, 0x08, 4, 1);
        write(&mut c, 0x0c, 4, 1);
        write(&mut c, 0x14, 1, 0x0b);
        assert_eq!(read(&c, 0x14, 1) & u64::from(status::FEATURES_OK), 0);
        assert_eq!(write(&mut c, 0x14, 1, 0x0f), StatusChange::None);
    }

    #[test]
    fn out_of_range_selects_and_vectors_are_harmless() {
        let mut c = CommonConfig::new(VIRTIO_F_VERSION_1, &[16], 1);
        write(&mut c, 0x16, 2, 9);
        assert_eq!(read(&c, 0x18, 2), 0);
        write(&mut c, 0x18, 2, 4);
        write(&mut c, 0x20, 4, 4);
        assert_eq!(read(&c, 0x20, 4), 0);
        write(&mut c, 0x16, 2, 0);
        write(&mut c, 0x1a, 2, 5);
        assert_eq!(read(&c, 0x1a, 2), u64::from(NO_VECTOR));
        write(&mut c, 0x10, 2, 0);
        assert_eq!(read(&c, 0x10, 2), 0);
        assert_eq!(read(&c, 0x12, 2), 1);
        assert_eq!(read(&c, 0x13, 1), 0, "odd access");
        write(&mut c, 0x21, 2, 7);
        write(&mut c, 0x99, 4, 7);
    }
}
