//! omd, om's per-node daemon.
//!
//! One omd runs on every node. It is the page server that receives images from other nodes over the
//! authenticated wire protocol of `om-transport` ([`image`]: memfd-backed sparse images with memory
//! limits; [`checkpoint`]: images written to and read from checkpoint directories), the local control
//! point for `omrun`, `omctl` and the runtime ([`control`]), and later the spawner of `om-restore`
//! (issue #5).

pub mod checkpoint;
pub mod control;
pub mod daemon;
pub mod image;
pub mod restorer;
pub mod runtimes;
mod sys;

pub use daemon::{Config, Daemon, DaemonError};
pub use image::{Image, Limits, ReserveStatus, Store};
pub use sys::{ImageMemory, WarmMemory};
