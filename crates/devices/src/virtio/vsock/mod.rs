//! virtio-vsock with a userspace host end (the model Firecracker users know): [`packet`] the
//! packet header, [`connection`] one connection's state and credit, [`muxer`] the Unix
//! sockets behind the connections, [`rings`] the queues, [`device`] the device itself,
//! [`persist`] its state in checkpoints and migrations, [`fuzz`] the entry point the fuzz target and its CI stand-in share.

pub mod connection;
pub mod device;
pub mod fuzz;
pub mod muxer;
pub mod packet;
pub mod persist;
pub mod rings;

#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockError};
