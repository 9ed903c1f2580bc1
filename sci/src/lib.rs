//! om's Dolphin SCI transport over the SISCI API.
//!
//! The page server exports a segment per image window; the runtime maps it and stores small runs by PIO
//! and large ones by DMA. This crate is built in issue #8, together with the SISCI emulation CI runs
//! against; until then it is empty.
