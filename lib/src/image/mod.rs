//! The process image: what capture writes and restore reads.
//!
//! An image is the wire protocol's `Begin` (process identity and VMA table), the page runs with their
//! data, and records ([`records`]) for everything that is not memory: threads, the process's kernel
//! state, file descriptors. A checkpoint directory ([`checkpoint`]) holds one image on disk.

pub mod checkpoint;
pub mod codec;
pub mod records;

pub use checkpoint::{Checkpoint, CheckpointError, Run};
pub use records::{FdKind, FdRecord, MappedFile, ProcessRecord, RecordError, ThreadRecord};
