//! The SISCI library, loaded at run time: no build needs it, and a node without it runs everything
//! but the SCI transport.
//!
//! Dolphin's headers rename every function: programs built with `-D_REENTRANT` link
//! `_SISCI_PUBLIC_FUNC_MT_<name>`, others `_SISCI_PUBLIC_FUNC_ST_<name>`, and the flag values are
//! data symbols `_SISCI_PUBLIC_CONST_<name>`. The loader takes the thread-safe names, then the plain
//! name, never the single-threaded ones (omd and the placer call from several threads); flags are
//! read from the library, with Dolphin's values as fallback.

use std::ffi::{c_char, c_int, c_uint, c_void};

use crate::error::SciError;

pub type Handle = *mut c_void;
pub type ErrOut = *mut c_uint;
pub type DmaCallback = Option<unsafe extern "C" fn(*mut c_void, Handle, c_uint) -> c_int>;

/// The functions of the SISCI API the transport uses, with Dolphin's prototypes (API 2.0: sizes and
/// offsets are `size_t`).
#[derive(Debug)]
pub struct Api {
    pub path: String,
    pub initialize: unsafe extern "C" fn(c_uint, ErrOut),
    pub open: unsafe extern "C" fn(*mut Handle, c_uint, ErrOut),
    pub close: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub get_local_node_id: unsafe extern "C" fn(c_uint, *mut c_uint, c_uint, ErrOut),
    pub create_segment:
        unsafe extern "C" fn(Handle, *mut Handle, c_uint, usize, Handle, Handle, c_uint, ErrOut),
    pub remove_segment: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub register_segment_memory: unsafe extern "C" fn(*mut c_void, usize, Handle, c_uint, ErrOut),
    pub prepare_segment: unsafe extern "C" fn(Handle, c_uint, c_uint, ErrOut),
    pub set_segment_available: unsafe extern "C" fn(Handle, c_uint, c_uint, ErrOut),
    pub set_segment_unavailable: unsafe extern "C" fn(Handle, c_uint, c_uint, ErrOut),
    pub map_local_segment:
        unsafe extern "C" fn(Handle, *mut Handle, usize, usize, *mut c_void, c_uint, ErrOut) -> *mut c_void,
    pub unmap_segment: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub connect_segment: unsafe extern "C" fn(
        Handle,
        *mut Handle,
        c_uint,
        c_uint,
        c_uint,
        Handle,
        Handle,
        c_uint,
        c_uint,
        ErrOut,
    ),
    pub disconnect_segment: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub get_remote_segment_size: unsafe extern "C" fn(Handle) -> usize,
    pub map_remote_segment:
        unsafe extern "C" fn(Handle, *mut Handle, usize, usize, *mut c_void, c_uint, ErrOut) -> *mut c_void,
    pub mem_cpy: unsafe extern "C" fn(Handle, *mut c_void, Handle, usize, usize, c_uint, ErrOut),
    pub create_map_sequence: unsafe extern "C" fn(Handle, *mut Handle, c_uint, ErrOut),
    pub remove_sequence: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub store_barrier: unsafe extern "C" fn(Handle, c_uint),
    pub flush: unsafe extern "C" fn(Handle, c_uint),
    pub create_dma_queue: unsafe extern "C" fn(Handle, *mut Handle, c_uint, c_uint, c_uint, ErrOut),
    pub remove_dma_queue: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    /// DMA straight from user memory (not in every library version).
    pub start_dma_transfer_mem: Option<
        unsafe extern "C" fn(
            Handle,
            *mut c_void,
            Handle,
            usize,
            usize,
            DmaCallback,
            *mut c_void,
            c_uint,
            ErrOut,
        ),
    >,
    pub wait_for_dma_queue: unsafe extern "C" fn(Handle, c_uint, c_uint, ErrOut) -> c_uint,
    pub create_interrupt:
        unsafe extern "C" fn(Handle, *mut Handle, c_uint, *mut c_uint, Handle, Handle, c_uint, ErrOut),
    pub remove_interrupt: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub wait_for_interrupt: unsafe extern "C" fn(Handle, c_uint, c_uint, ErrOut),
    pub connect_interrupt:
        unsafe extern "C" fn(Handle, *mut Handle, c_uint, c_uint, c_uint, c_uint, c_uint, ErrOut),
    pub disconnect_interrupt: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub trigger_interrupt: unsafe extern "C" fn(Handle, c_uint, ErrOut),
    pub get_error_string: Option<unsafe extern "C" fn(c_uint) -> *const c_char>,
    /// `SCI_FLAG_EMPTY`.
    pub flag_empty: c_uint,
    /// `SCI_INFINITE_TIMEOUT`.
    pub infinite_timeout: c_uint,
    /// `SCI_FLAG_FORCE_REMOVE`.
    pub flag_force_remove: c_uint,
    /// The library's DMA engine is the CPU (the emulation exports `_SISCI_EMU_DMA_ENGINE_IS_CPU`).
    pub engine_is_cpu: bool,
    /// Keeps the code of every pointer above mapped.
    _lib: libloading::Library,
}

/// Where the library is looked for: `OM_SISCI_LIB`, the loader's search path, Dolphin's default
/// install.
fn candidates(explicit: Option<&str>) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(p) = explicit {
        v.push(p.to_owned());
        return v;
    }
    if let Some(p) = std::env::var_os("OM_SISCI_LIB") {
        v.push(p.to_string_lossy().into_owned());
        return v;
    }
    v.push("libsisci.so".into());
    v.push("/opt/DIS/lib64/libsisci.so".into());
    v
}

/// Looks up function `name` under Dolphin's linkage names.
///
/// # Safety
/// `T` must be the function's true C type.
unsafe fn function<T: Copy>(
    lib: &libloading::Library,
    path: &str,
    name: &'static str,
) -> Result<T, SciError> {
    // SAFETY: the caller's promise, passed on.
    unsafe { optional(lib, name) }.ok_or(SciError::Symbol {
        path: path.to_owned(),
        symbol: name,
    })
}

/// Looks up function `name`, which the library may lack.
///
/// # Safety
/// `T` must be the function's true C type.
unsafe fn optional<T: Copy>(lib: &libloading::Library, name: &str) -> Option<T> {
    // Not the single-threaded `_ST_` names: omd and the placer call the library from several
    // threads.
    for prefix in ["_SISCI_PUBLIC_FUNC_MT_", ""] {
        let symbol = format!("{prefix}{name}\0");
        // SAFETY: the caller's promise: `T` is the prototype Dolphin's headers give `name`.
        if let Ok(f) = unsafe { lib.get::<T>(symbol.as_bytes()) } {
            return Some(*f);
        }
    }
    None
}

/// The value of constant `name`, or `fallback` when the library does not export it.
fn constant(lib: &libloading::Library, name: &str, fallback: c_uint) -> c_uint {
    let symbol = format!("_SISCI_PUBLIC_CONST_{name}\0");
    // SAFETY: Dolphin's headers declare these as `extern const unsigned int`.
    match unsafe { lib.get::<*const c_uint>(symbol.as_bytes()) } {
        // SAFETY: a data symbol of the library, a const unsigned int, mapped while `lib` is.
        Ok(p) if !p.is_null() => unsafe { p.read() },
        _ => fallback,
    }
}

impl Api {
    /// Loads the library (`explicit`, or the usual places) and every function the transport needs.
    ///
    /// # Errors
    /// No library, or one without a needed function.
    pub fn load(explicit: Option<&str>) -> Result<Self, SciError> {
        let mut reasons = Vec::new();
        for path in candidates(explicit) {
            // SAFETY: loading Dolphin's library (or its emulation) runs its initialisers, which have
            // no preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => return Self::bind(lib, path),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        Err(SciError::Load {
            tried: candidates(explicit).join(", "),
            reason: reasons.join("; "),
        })
    }

    fn bind(lib: libloading::Library, path: String) -> Result<Self, SciError> {
        let p = path.as_str();
        macro_rules! required {
            ($name:literal) => {{
                // SAFETY: the field this initializes is typed with Dolphin's prototype for $name.
                unsafe { function(&lib, p, $name) }?
            }};
        }
        macro_rules! maybe {
            ($name:literal) => {{
                // SAFETY: as for `required`.
                unsafe { optional(&lib, $name) }
            }};
        }
        Ok(Self {
            initialize: required!("SCIInitialize"),
            open: required!("SCIOpen"),
            close: required!("SCIClose"),
            get_local_node_id: required!("SCIGetLocalNodeId"),
            create_segment: required!("SCICreateSegment"),
            remove_segment: required!("SCIRemoveSegment"),
            register_segment_memory: required!("SCIRegisterSegmentMemory"),
            prepare_segment: required!("SCIPrepareSegment"),
            set_segment_available: required!("SCISetSegmentAvailable"),
            set_segment_unavailable: required!("SCISetSegmentUnavailable"),
            map_local_segment: required!("SCIMapLocalSegment"),
            unmap_segment: required!("SCIUnmapSegment"),
            connect_segment: required!("SCIConnectSegment"),
            disconnect_segment: required!("SCIDisconnectSegment"),
            get_remote_segment_size: required!("SCIGetRemoteSegmentSize"),
            map_remote_segment: required!("SCIMapRemoteSegment"),
            mem_cpy: required!("SCIMemCpy"),
            create_map_sequence: required!("SCICreateMapSequence"),
            remove_sequence: required!("SCIRemoveSequence"),
            store_barrier: required!("SCIStoreBarrier"),
            flush: required!("SCIFlush"),
            create_dma_queue: required!("SCICreateDMAQueue"),
            remove_dma_queue: required!("SCIRemoveDMAQueue"),
            start_dma_transfer_mem: maybe!("SCIStartDmaTransferMem"),
            wait_for_dma_queue: required!("SCIWaitForDMAQueue"),
            create_interrupt: required!("SCICreateInterrupt"),
            remove_interrupt: required!("SCIRemoveInterrupt"),
            wait_for_interrupt: required!("SCIWaitForInterrupt"),
            connect_interrupt: required!("SCIConnectInterrupt"),
            disconnect_interrupt: required!("SCIDisconnectInterrupt"),
            trigger_interrupt: required!("SCITriggerInterrupt"),
            get_error_string: maybe!("SCIGetErrorString"),
            flag_empty: constant(&lib, "SCI_FLAG_EMPTY", 0x2),
            infinite_timeout: constant(&lib, "SCI_INFINITE_TIMEOUT", 0xffff_ffff),
            flag_force_remove: constant(&lib, "SCI_FLAG_FORCE_REMOVE", 0x20),
            // SAFETY: the emulation declares this as a `const unsigned int`; Dolphin's library has
            // no such symbol.
            engine_is_cpu: unsafe { lib.get::<*const c_uint>(b"_SISCI_EMU_DMA_ENGINE_IS_CPU\0") }
                .ok()
                .filter(|p| !p.is_null())
                // SAFETY: a data symbol of the library, mapped while `lib` is.
                .is_some_and(|p| unsafe { p.read() } == 1),
            path,
            _lib: lib,
        })
    }
}
