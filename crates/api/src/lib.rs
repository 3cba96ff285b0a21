//! Types shared by every vhpc component: what a user asks for (validated configs) and, later,
//! API requests and the snapshot and migration wire formats. No logic beyond validation.

pub mod disk_config;
pub mod net_config;
pub mod rest;
pub mod vm_config;
pub mod vsock_config;

pub use disk_config::{DiskConfig, DiskConfigError};
pub use net_config::{MacAddr, NetBackend, NetConfig, NetConfigError, derived_tap_name};

pub use vm_config::{
    ConfigError, HostLimits, MAX_DISKS, MAX_NICS, MIN_MEMORY_MIB, MemoryConfig, VmConfig,
};
pub use vsock_config::{DEFAULT_GUEST_CID, VsockConfig, VsockConfigError};
