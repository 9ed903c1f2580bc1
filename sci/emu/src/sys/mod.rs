//! The C surface (`ffi`) and the operating-system calls (`os`): the only `unsafe` code.

mod ffi;
pub mod os;
