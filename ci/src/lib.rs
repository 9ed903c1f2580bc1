//! om's multi-node test rig: N nodes as network namespaces on one bridge, on one machine.
//!
//! ```text
//!   root namespace: nothing of the rig lives here but its processes' parents
//!
//!   <id>-n0 [eth0 10.77.0.1/24]──┐
//!   <id>-n1 [eth0 10.77.0.2/24]──┼── <id>-sw: bridge br0 with ports p0, p1, p2
//!   <id>-n2 [eth0 10.77.0.3/24]──┘
//! ```
//!
//! Every rig has its own switch namespace, so several rigs (tests running at the same time) use the
//! same fixed addresses without seeing each other. Names are `omrig-<owner pid>-<seq>`.
//!
//! Teardown is guaranteed: before it creates anything, the rig starts a reaper (`reaper.sh`) in its
//! own process group that waits for the owner to close a pipe. Dropping the rig, a panic, or the
//! owner's death by any signal closes it; the reaper then kills every process inside the rig's
//! namespaces and deletes them, which removes the veths and the bridge with them. A rig whose reaper
//! was killed too is swept by the next rig that starts on the machine.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` from iproute2. [`slurm`] runs a one-node
//! Slurm cluster inside a node, for jobs under `srun`.

mod rig;
pub mod slurm;

pub use rig::{
    Leftovers, MAX_NODES, NODE_SUBNET, Node, OMD_PORT, OmdHandle, Rig, RigError, leftovers, sweep_stale,
};
