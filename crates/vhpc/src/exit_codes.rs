//! Exit statuses of `vhpc run` and `vhpc lab run` besides the command's own.
//!
//! A command's status (0-255) passes through unchanged, so these can collide with a command
//! that exits with the same number; they follow the conventions of `timeout` and `docker run`.

/// The VM ran past `--timeout`.
pub const TIMED_OUT: i32 = 124;
/// vhpc itself failed: bad input, KVM refused, the guest crashed the vCPU.
pub const VHPC_ERROR: i32 = 125;
/// The guest kernel panicked.
pub const GUEST_PANIC: i32 = 123;
/// `vhpc lab run`: the emulated host ended before the command reported a status (its kernel
/// panicked, or the emulated machine reset): the emulated machine failed, not necessarily
/// the command.
pub const LAB_HOST_CRASHED: i32 = 122;
