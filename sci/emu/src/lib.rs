//! An emulation of Dolphin's SISCI API, the subset om's SCI transport uses, for machines without
//! Dolphin hardware (CI, laptops). Built as `libsisci.so`, it exports the same C symbols as Dolphin's
//! library: every function under both of the names Dolphin's headers link against
//! (`_SISCI_PUBLIC_FUNC_MT_<name>` for `-D_REENTRANT` builds, `_SISCI_PUBLIC_FUNC_ST_<name>`
//! otherwise) and the flag constants as data symbols (`_SISCI_PUBLIC_CONST_<name>`).
//!
//! **This is not Dolphin's library and has not been compared with real hardware.** It follows the
//! API's documented semantics and error codes (see `docs/sci.md` for the sources), on one host:
//!
//! - **Nodes.** A "node" is a network namespace: its node id is allocated (4, 8, 12, ...) the first
//!   time a process of that namespace asks, and recorded in the fabric directory
//!   (`$SISCI_EMU_DIR`, default `/dev/shm/sisci-emu`), which every namespace of the host shares.
//!   `SISCI_EMU_NODE_ID` overrides it for one process.
//! - **Segments.** A local segment is an entry `seg.<node>.<id>` in the fabric directory. Its memory
//!   is a file the emulation creates, or (`SCI_FLAG_EMPTY` + `SCIRegisterSegmentMemory`) the shared
//!   mapping the caller registers, reached by other processes through `/proc/<pid>/fd/<n>`. Remote
//!   segments map the same memory: a store on one side is a store on the other, as with PIO over the
//!   fabric. Entries of processes that died are reclaimed.
//! - **DMA.** A queue runs each transfer to completion when it is started (the emulated engine is
//!   synchronous), with the kernel copying (`pwrite`, `copy_file_range`), so a source that is not
//!   mapped ends the transfer in `SCI_DMAQUEUE_ERROR` instead of a crash, as a pinning driver would.
//! - **Interrupts.** An interrupt is a counter in a shared file `irq.<node>.<no>`; a trigger adds one
//!   and wakes a futex, a wait takes one (so no trigger is lost) or times out.
//!
//! The emulation starts no threads and allocates nothing in the data path (`SCIMemCpy`, barriers,
//! DMA, triggers), so it may be called with other threads of the process stopped, as om's final
//! round does.

mod codes;
mod fabric;
mod sys;

pub use codes::*;
