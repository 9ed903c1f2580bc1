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
//!   is a sealed memfd the emulation creates, or (`SCI_FLAG_EMPTY` + `SCIRegisterSegmentMemory`) the
//!   shared mapping the caller registers. Other processes get its descriptor from the owner's
//!   descriptor server (a unix socket in the fabric directory: processes in other pid namespaces
//!   cannot open `/proc/<pid>/fd`). Remote segments map the same memory: a store on one side is a
//!   store on the other, as with PIO over the fabric. Entries of processes that died are reclaimed.
//! - **DMA.** A queue runs each transfer to completion when it is started (the emulated engine is
//!   synchronous), with the kernel copying (`pwrite`, `copy_file_range`), so a source that is not
//!   mapped ends the transfer in `SCI_DMAQUEUE_ERROR` instead of a crash, as a pinning driver would.
//! - **Interrupts.** An interrupt is a counter in a shared file `irq.<node>.<no>`; a trigger adds one
//!   and wakes a futex, a wait takes one (so no trigger is lost) or times out.
//!
//! In a process that only connects (a sender), the emulation starts no thread, and `SCIMemCpy`,
//! barriers and triggers allocate nothing, so they may be called with the process's other threads
//! stopped, as om's final round does. (A DMA transfer asks the segment owner's descriptor server
//! for the memory, which allocates; om's final round does not DMA.) An owner of registered or
//! created segments runs one thread: the descriptor server.

mod codes;
mod fabric;
mod sys;

pub use codes::*;
