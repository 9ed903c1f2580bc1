//! The TCP transport: `sendmsg` from the application's pages on the sending side, `readv` into the
//! image on the receiving side, several connections per session to use more cores.

pub mod receiver;
pub mod sender;

pub use receiver::{CopyFate, Outcome, Receiver, ReceiverConfig};
pub use sender::{SenderConfig, TcpSender};
