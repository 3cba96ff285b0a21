//! Device state for checkpoints: every device saves its guest-visible state into a plain
//! serde struct and restores it from one.
//!
//! [`Persist`] is the typed trait a device implements (no default: a device that forgot its
//! state would restore a broken guest silently). [`DeviceState`] is its object-safe form,
//! implemented for every `Persist` type: it encodes the state with postcard and tags it with
//! the state type's version, so the VMM can checkpoint a list of `dyn` devices (the PCI bus)
//! without knowing their types. A device added later (virtio-net, virtio-vsock) only
//! implements `Persist` for itself (and `VirtioBackend` does the rest).
//!
//! Restore happens into a freshly built device with the same configuration (same disk file,
//! same queues): only what the guest changed is in the state, never host resources (fds,
//! threads), which the new device already has.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersistError {
    #[error(
        "state version {found} of {device} is not one this vhpc reads (it reads {expected}); \
         restore with the vhpc that wrote the checkpoint"
    )]
    Version {
        device: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("the saved state of {device} is damaged: {detail}")]
    Decode {
        device: &'static str,
        detail: String,
    },
    #[error("cannot encode the state of {device}: {detail}")]
    Encode {
        device: &'static str,
        detail: String,
    },
    #[error(
        "the saved state of {device} does not fit this VM's device: {detail}; restore with \
         the configuration the checkpoint was taken with"
    )]
    Mismatch {
        device: &'static str,
        detail: String,
    },
    #[error("cannot restore {device}: {detail}")]
    Restore {
        device: &'static str,
        detail: String,
    },
}

/// The state of a device that has none the guest could observe (it is still recorded, so
/// a later version with state has a version to bump).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NoState {}

/// A device whose guest-visible state can be saved and restored.
pub trait Persist {
    /// The saved state: a plain serde struct (a new layout is a new version).
    type State: Serialize + DeserializeOwned;
    /// The version of [`Persist::State`]'s layout, recorded beside it.
    const VERSION: u32;
    /// The device's name in error messages.
    const NAME: &'static str;

    /// The device's state; the device must be quiet (vCPUs paused, workers stopped).
    fn save(&self) -> Result<Self::State, PersistError>;
    /// Puts a freshly built device into `state`. Everything in `state` may come from a
    /// damaged or crafted file: check it, return an error, never panic.
    fn restore(&mut self, state: Self::State) -> Result<(), PersistError>;
}

/// The object-safe form of [`Persist`]: versioned, encoded state.
pub trait DeviceState {
    fn state_version(&self) -> u32;
    fn save_state(&self) -> Result<Vec<u8>, PersistError>;
    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), PersistError>;
}

impl<T: Persist> DeviceState for T {
    fn state_version(&self) -> u32 {
        T::VERSION
    }

    fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        encode::<T>(&self.save()?)
    }

    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), PersistError> {
        if version != T::VERSION {
            return Err(PersistError::Version {
                device: T::NAME,
                found: version,
                expected: T::VERSION,
            });
        }
        self.restore(decode::<T>(bytes)?)
    }
}

/// Encodes `T`'s state with postcard.
pub fn encode<T: Persist>(state: &T::State) -> Result<Vec<u8>, PersistError> {
    postcard::to_allocvec(state).map_err(|e| PersistError::Encode {
        device: T::NAME,
        detail: e.to_string(),
    })
}

/// Decodes `T`'s state; trailing bytes are damage too.
pub fn decode<T: Persist>(bytes: &[u8]) -> Result<T::State, PersistError> {
    let (state, rest) =
        postcard::take_from_bytes::<T::State>(bytes).map_err(|e| PersistError::Decode {
            device: T::NAME,
            detail: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(PersistError::Decode {
            device: T::NAME,
            detail: format!("{} bytes after the state", rest.len()),
        });
    }
    Ok(state)
}
