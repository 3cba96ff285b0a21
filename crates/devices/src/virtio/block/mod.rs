//! virtio-blk on a raw image file: [`device`] the device (features, config space, opening
//! the image), [`request`] request parsing and I/O, [`fuzz`] the entry point the fuzz target
//! and its CI stand-in share.

pub mod device;
pub mod fuzz;
pub mod request;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockError};
