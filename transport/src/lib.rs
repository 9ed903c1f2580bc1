//! om's transports: how pages move from an application's memory into another node's image.
//!
//! - [`api`]: the [`PageSender`] and [`ImageSink`]/[`ImageStore`] traits every transport fits;
//! - [`wire`]: the versioned wire protocol (handshake, frames, messages, caps), with its sequence and
//!   state diagrams;
//! - [`auth`]: mutual authentication with the cluster key ([`key`]) and per-connection frame keys;
//! - [`tcp`]: the TCP transport (sender and receiver);
//! - [`relay`]: the home relay of a migrated process (stdio, signals, exit status);
//! - [`sys`]: the raw-memory operations (vectored socket I/O, page checksums), the only `unsafe` code.

pub mod api;
pub mod auth;
pub mod batch;
pub mod conn;
pub mod error;
pub mod key;
pub mod relay;
pub mod sys;
pub mod tcp;
pub mod wire;

pub use api::{FilePiece, ImageSink, ImageStore, PageSender, Refusal, RoundStats};
pub use error::TransportError;
pub use key::{ClusterKey, KeyError};
pub use tcp::{Receiver, ReceiverConfig, SenderConfig, TcpSender};
