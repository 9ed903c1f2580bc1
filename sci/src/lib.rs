//! om's Dolphin SCI transport over the SISCI API.
//!
//! The control connection stays TCP (authentication, VMA tables, rounds, records, the two-phase
//! commit: the same rules as the TCP transport); pages move over the SCI fabric:
//!
//! - the receiver ([`SciExporter`], in omd) exports each incoming image's memory as segments of one
//!   GiB (*windows*), plus a small mailbox segment and a doorbell interrupt, and tells the sender
//!   where each address range lands (`Placement`);
//! - the sender ([`SciPlacer`], in the runtime) maps the windows and stores each piece of a batch
//!   straight from the application's memory: by PIO for small pieces, by DMA for large ones
//!   (`SCIStartDmaTransferMem`); then it posts the batch's descriptor (runs and checksums) to the
//!   [`mailbox`] and rings the doorbell. omd checks the checksums of the pages in place, as for TCP.
//!
//! The SISCI library is loaded at run time ([`sys::api`]): `OM_SISCI_LIB`, else `libsisci.so` from
//! the loader's path or `/opt/DIS/lib64`. CI runs against the emulation in `sci/emu`; real Dolphin
//! hardware has not been tested (see `docs/sci.md`).

pub mod error;
pub mod exporter;
pub mod mailbox;
pub mod placer;
pub mod sys;

pub use error::{Code, SciError};
pub use exporter::{SciExport, SciExporter};
pub use placer::{Racy, SciPlacer};
