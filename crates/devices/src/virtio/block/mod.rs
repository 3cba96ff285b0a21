//! virtio-blk on a raw image file: [`device`] the device (features, config space, opening
//! the image), [`request`] request parsing and I/O, [`backend`] the image file's vectored
//! I/O straight into guest memory, [`fuzz`] the entry point the fuzz target
//! and its CI stand-in share.

pub mod backend;
pub mod device;
pub mod fuzz;
pub mod request;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockError};
