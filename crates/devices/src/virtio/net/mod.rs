//! virtio-net on a TAP device: [`device`] the device (features, config space) and its
//! worker-thread handler, [`frames`] moving frames between virtqueues and a backend,
//! [`tap`] the TAP device, [`host_if`] host interface ioctls (up, bridge ports), [`persist`]
//! its state in checkpoints and migrations and the announcement after a move, [`fuzz`] the
//! entry point the fuzz target and its CI stand-in share.

pub mod device;
pub mod frames;
pub mod fuzz;
pub mod host_if;
pub mod persist;
pub mod tap;

#[cfg(test)]
mod tests;

pub use device::Net;
pub use tap::{Tap, TapError};
