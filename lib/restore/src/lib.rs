//! om-restore: brings a process image back to life.
//!
//! [`restore::Image`] opens and checks a checkpoint, [`plan`] decides where everything goes,
//! [`restore::restore`] builds the process tree and the new process turns itself into the image
//! ([`become_target`]), finishing in the restore blob ([`blob`], interpreted by code in [`sys`]).
//! `docs/checkpoint-restart.md` tells the whole story.

pub mod become_target;
pub mod blob;
pub mod error;
pub mod lazy;
pub mod plan;
pub mod restore;
pub mod sys;

pub use error::RestoreError;
pub use restore::{Ended, Image, restore};
