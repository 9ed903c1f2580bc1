//! om: a user-space successor to openMosix.
//!
//! This crate holds what every part of om shares: the process image model, dirty-page tracking, the
//! pre-copy engine, capture (inside the application, through `libomrt.so`) and restore, and the control
//! API that `omrun`, `omctl`, `omd` and the C ABI speak. See `docs/ARCHITECTURE.md` for the whole
//! picture and where each part lives.
//!
//! What it can do is listed in [`FEATURES`].

pub mod capture;
pub mod compat;
pub mod control;
pub mod dirty;
pub mod image;
pub mod precopy;
pub mod procstat;
pub mod sys;

pub mod features;

pub use features::{FEATURES, Feature};
