//! The pre-copy engine's pieces that do not need a process: when to stop copying.
//!
//! Live migration copies a running process's memory in rounds while it keeps writing to it: round 0
//! sends every populated page, round N the pages written during round N-1. [`converge::decide`]
//! looks at the rounds so far and says whether another round is worth it, and why not;
//! [`throttle`] slows the application down when it asks for that (auto-converge).

pub mod converge;
pub mod migrate;
pub mod throttle;

pub use converge::{Budget, Decision, RoundStats, StopReason, decide};
