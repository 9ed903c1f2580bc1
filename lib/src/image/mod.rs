//! The process image: what capture writes and restore reads.
//!
//! An image is the wire protocol's `Begin` (process identity and VMA table), the page runs with their
//! data, and records ([`records`]) for everything that is not memory: threads, the process's kernel
//! state, file descriptors. A checkpoint directory ([`checkpoint`]) holds one image on disk.

pub mod checkpoint;
pub mod codec;
pub mod records;

pub use checkpoint::{Checkpoint, CheckpointError, Run, Segment};
pub use records::{FdKind, FdRecord, MappedFile, ProcessRecord, RecordError, ThreadRecord};

/// Flags of a VMA in the image's VMA table (`wire::Vma::flags`).
pub mod vma_flags {
    /// `MAP_SHARED` (else private).
    pub const SHARED: u32 = 1 << 0;
    /// Backed by a file (its path is the name; else anonymous).
    pub const FILE: u32 = 1 << 1;
    /// The main thread's stack (`[stack]`).
    pub const STACK: u32 = 1 << 2;
    /// The program break area (`[heap]`).
    pub const HEAP: u32 = 1 << 3;
}
