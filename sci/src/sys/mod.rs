//! The SISCI library (loaded at run time) and safe handles on its objects: the only `unsafe` code of
//! the SCI transport.

pub mod api;
pub mod fabric;

pub use fabric::{
    DmaQueue, LocalInterrupt, LocalSegment, RemoteInterrupt, RemoteSegment, Sisci, View, Windows,
};
