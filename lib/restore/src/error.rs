//! What can go wrong in a restore. Every failure before the image runs leaves nothing behind: the
//! restorer's children end with it.

use std::path::PathBuf;

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The checkpoint could not be read.
    #[error("reading the checkpoint")]
    Checkpoint(#[source] om::image::CheckpointError),
    /// A checkpoint directory whose manifest lacks page checksums (only omd hands over pages it
    /// checked already).
    #[error("the checkpoint has no checksum for its pages")]
    Unchecked,
    /// A record could not be decoded.
    #[error("decoding a {what} record")]
    Record {
        /// Which record.
        what: &'static str,
        /// Why.
        #[source]
        source: om::image::records::RecordError,
    },
    /// A record the image needs is missing or duplicated.
    #[error("the image has {0}")]
    Records(String),
    /// The image belongs to another user.
    #[error("the image belongs to uid {image}; you are uid {you}")]
    Owner {
        /// The image's uid.
        image: u32,
        /// The caller's.
        you: u32,
    },
    /// The image cannot run on this machine.
    #[error("the image cannot run here")]
    Incompatible(#[source] om::compat::Incompatible),
    /// A file that a mapping needs is gone or changed.
    #[error("{path} (mapped by the process) {what}")]
    MappedFile {
        /// The file.
        path: String,
        /// What changed.
        what: String,
    },
    /// No plan could be made.
    #[error("planning the restore")]
    Plan(#[source] crate::plan::PlanError),
    /// The restorer's own areas could not be reserved.
    #[error("reserving {what} at {addr:#x}")]
    Reserve {
        /// Which area.
        what: &'static str,
        /// Where.
        addr: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A system call of the restorer's own setup failed.
    #[error("{what}")]
    Os {
        /// What was attempted.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The new process failed while it was set up (before the blob ran).
    #[error("setting up the process: {0}")]
    Setup(String),
    /// A step of the blob failed.
    #[error("step {index} ({step}) failed")]
    Step {
        /// Op index.
        index: u64,
        /// What it did.
        step: String,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// Pid 1 of the restorer's namespace ended without reporting the program's status.
    #[error("the restorer's pid 1 ended without reporting the program's status")]
    Vanished,
    /// The caller did not give the go for a held restore (a migration that was not committed).
    #[error("the restore was not committed; the restored copy is gone")]
    NotCommitted,
    /// Reading this process's own memory map failed.
    #[error("reading the restorer's memory map")]
    Maps(#[source] om::dirty::maps::MapsError),
    /// Serving lazy pages failed after the program started (it was stopped).
    #[error("serving the program's pages")]
    Lazy(#[source] crate::lazy::LazyError),
    /// A page of the image failed its checksum.
    #[error("page {addr:#x} of {path} fails its checksum")]
    PageChecksum {
        /// The pages file.
        path: PathBuf,
        /// The page.
        addr: u64,
    },
}

impl RestoreError {
    /// An [`RestoreError::Os`] for `what`.
    pub fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Os { what, source }
    }
}
