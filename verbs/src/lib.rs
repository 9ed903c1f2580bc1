//! om's InfiniBand/RoCE transport: pages go by RDMA WRITE straight from the application's memory
//! into the destination's image memory.
//!
//! The control connection stays TCP (authentication, VMA tables, rounds, records, the two-phase
//! commit: the same rules as the other transports). Over it the two sides exchange their queue
//! pairs' addresses ([`endpoint`]): the receiver's comes in its `Placement`, with one remote key
//! per window of image memory; the sender's goes back in `Connect`. Then:
//!
//! - the sender ([`VerbsPlacer`], in the runtime) registers the application's memory through a
//!   per-round registration cache bounded by `RLIMIT_MEMLOCK` ([`regcache`]) and writes each
//!   piece of a batch with RDMA WRITE from it (small pieces and copies go through a registered
//!   staging buffer), signalling one request in [`sys::queue::SIGNAL_EVERY`];
//! - after a batch's writes, its descriptor (runs and checksums) follows as a SEND on the same
//!   reliable connection, so it arrives after the pages it describes;
//! - the receiver ([`VerbsExporter`], in omd) lands each descriptor as for TCP: every page's
//!   checksum is checked in place;
//! - where the device offers on-demand paging, omd's windows are registered on demand, pinning
//!   nothing, and so is the sender's memory where pinning cannot work or `OM_VERBS_ODP=on` asks
//!   ([`odp`]).
//!
//! libibverbs is loaded at run time ([`sys::library`]): builds need no rdma-core, and a node without
//! it runs everything but this transport. See `docs/verbs.md`.

pub mod endpoint;
pub mod error;
pub mod exporter;
pub mod odp;
pub mod placer;
pub mod regcache;
pub mod sys;

pub use error::VerbsError;
pub use exporter::{VerbsExport, VerbsExporter};
pub use placer::VerbsPlacer;
