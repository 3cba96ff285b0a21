//! The configuration of one VM, as the user gives it (`vhpc run` flags or the API).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{DiskConfig, DiskConfigError, NetConfig, NetConfigError};

/// Guest memory options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Guest RAM size in MiB.
    pub size_mib: u64,
    /// Back guest RAM with 2 MiB hugetlbfs pages (they must be reserved on the host).
    #[serde(default)]
    pub hugepages: bool,
    /// Touch every page before the guest starts, so it never faults on first access.
    #[serde(default)]
    pub prefault: bool,
}

/// Everything needed to boot one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    pub memory: MemoryConfig,
    /// A bzImage or an ELF vmlinux.
    pub kernel: PathBuf,
    /// An uncompressed or compressed cpio initramfs.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in the order the guest sees them (eth0, eth1, ...).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
}

/// Limits the host imposes on a VM, measured at run time.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// The most vCPUs KVM allows in one VM.
    pub max_vcpus: u32,
    /// Host RAM in MiB.
    pub host_memory_mib: u64,
}

/// A config the user has to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("a VM needs at least 1 vCPU (got --vcpus 0)")]
    NoVcpus,
    #[error("{requested} vCPUs requested, but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("a VM needs at least {min} MiB of memory (got --memory {requested})")]
    TooLittleMemory { requested: u64, min: u64 },
    #[error("{requested} MiB of memory requested, but this host has only {host} MiB")]
    TooMuchMemory { requested: u64, host: u64 },
    #[error("the kernel command line is empty")]
    EmptyCmdline,
    #[error("{count} disks requested, but at most {max} fit on the VM's PCI bus")]
    TooManyDisks { count: usize, max: usize },
    #[error(transparent)]
    Disk(#[from] DiskConfigError),
    #[error("{count} network interfaces requested, but a VM has at most {max}")]
    TooManyNics { count: usize, max: usize },
    #[error(
        "{count} disks and network interfaces requested, but at most {max} fit on the VM's PCI bus"
    )]
    TooManyDevices { count: usize, max: usize },
    #[error(transparent)]
    Net(#[from] NetConfigError),
}

/// Disks per VM: PCI bus 0 has 31 slots besides the host bridge; keep room for other devices.
pub const MAX_DISKS: usize = 24;

/// Network interfaces per VM.
pub const MAX_NICS: usize = 8;

/// PCI bus 0 has 32 slots; the host bridge takes one.
const MAX_PCI_DEVICES: usize = 31;

/// The smallest guest the boot layout fits in (page tables, ACPI, a kernel and an initramfs).
pub const MIN_MEMORY_MIB: u64 = 16;

impl VmConfig {
    /// Checks the config against the host's limits; the first problem found is returned.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > limits.max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: limits.max_vcpus,
            });
        }
        let requested = self.memory.size_mib;
        if requested < MIN_MEMORY_MIB {
            return Err(ConfigError::TooLittleMemory {
                requested,
                min: MIN_MEMORY_MIB,
            });
        }
        if requested > limits.host_memory_mib {
            return Err(ConfigError::TooMuchMemory {
                requested,
                host: limits.host_memory_mib,
            });
        }
        if self.cmdline.trim().is_empty() {
            return Err(ConfigError::EmptyCmdline);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks {
                count: self.disks.len(),
                max: MAX_DISKS,
            });
        }
        if self.nets.len() > MAX_NICS {
            return Err(ConfigError::TooManyNics {
                count: self.nets.len(),
                max: MAX_NICS,
            });
        }
        if self.disks.len() + self.nets.len() > MAX_PCI_DEVICES {
            return Err(ConfigError::TooManyDevices {
                count: self.disks.len() + self.nets.len(),
                max: MAX_PCI_DEVICES,
            });
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        crate::net_config::validate_all(&self.nets)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vcpus: u32, size_mib: u64) -> VmConfig {
        VmConfig {
            vcpus,
            memory: MemoryConfig {
                size_mib,
                hugepages: false,
                prefault: false,
            },
            kernel: PathBuf::from("/k"),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 8,
        host_memory_mib: 4096,
    };

    #[test]
    fn accepts_a_sane_config() {
        assert_eq!(config(2, 512).validate(&LIMITS), Ok(()));
        assert_eq!(config(8, 4096).validate(&LIMITS), Ok(()));
    }

    #[test]
    fn rejects_zero_and_too_many_vcpus() {
        assert_eq!(config(0, 512).validate(&LIMITS), Err(ConfigError::NoVcpus));
        assert_eq!(
            config(9, 512).validate(&LIMITS),
            Err(ConfigError::TooManyVcpus {
                requested: 9,
                max: 8
            })
        );
    }

    #[test]
    fn rejects_zero_and_too_much_memory() {
        assert!(matches!(
            config(1, 0).validate(&LIMITS),
            Err(ConfigError::TooLittleMemory { requested: 0, .. })
        ));
        assert_eq!(
            config(1, 4097).validate(&LIMITS),
            Err(ConfigError::TooMuchMemory {
                requested: 4097,
                host: 4096
            })
        );
    }

    #[test]
    fn rejects_an_empty_cmdline() {
        let mut c = config(1, 512);
        c.cmdline = "  ".into();
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::EmptyCmdline));
    }

    #[test]
    fn errors_read_as_instructions() {
        let msg = ConfigError::TooManyVcpus {
            requested: 9,
            max: 8,
        }
        .to_string();
        assert!(msg.contains("at most 8"), "{msg}");
    }
}
