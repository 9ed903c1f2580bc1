//! omd, om's per-node daemon.
//!
//! One omd runs on every node. It will be the page server that receives images from other nodes
//! (issue #4), the spawner of `om-restore` (issue #5), and the local control point for `omrun`, `omctl`
//! and the runtime. Today it authenticates its configuration (the cluster key), owns its listen and
//! control sockets, answers `ping` on the control socket, and refuses everything else clearly.

pub mod control;
pub mod daemon;

pub use daemon::{Config, Daemon, DaemonError};
