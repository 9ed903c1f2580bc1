//! Everything that calls libibverbs: the ABI, the run-time loaded library, safe owners of its
//! objects and the work queues. The only module of this crate with `unsafe`.

pub mod abi;
pub mod device;
pub mod library;
pub mod memory;
pub mod queue;

pub use device::{Cq, Device, Mr, Qp};
pub use library::Library;
pub use memory::Anon;
pub use queue::{RecvRing, SendQueue};
