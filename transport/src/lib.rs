//! om's transports: how pages move from an application's memory into another node's image.
//!
//! Today this crate holds the cluster key, the shared secret that authenticates every omd-to-omd and
//! runtime-to-omd connection. The `Transport` trait, the wire protocol and the TCP transport follow
//! (issue #4).

pub mod key;

pub use key::{ClusterKey, KeyError};
