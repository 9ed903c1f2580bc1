//! libibverbs, loaded at run time: no build needs rdma-core, and a node without it runs everything but
//! the verbs transport.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

use super::abi::{Context, Cq, Gid, Mr, Pd, PortAttr, Qp, QpAttr, QpInitAttr};
use crate::error::VerbsError;

/// The library's file name (its soname: present wherever rdma-core's runtime is installed).
pub const SONAME: &str = "libibverbs.so.1";

/// The functions of libibverbs om calls, with rdma-core's prototypes.
#[derive(Debug)]
pub struct Library {
    pub get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut *mut c_void,
    pub free_device_list: unsafe extern "C" fn(*mut *mut c_void),
    pub get_device_name: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    pub open_device: unsafe extern "C" fn(*mut c_void) -> *mut Context,
    pub close_device: unsafe extern "C" fn(*mut Context) -> c_int,
    pub alloc_pd: unsafe extern "C" fn(*mut Context) -> *mut Pd,
    pub dealloc_pd: unsafe extern "C" fn(*mut Pd) -> c_int,
    pub reg_mr: unsafe extern "C" fn(*mut Pd, *mut c_void, usize, c_int) -> *mut Mr,
    pub dereg_mr: unsafe extern "C" fn(*mut Mr) -> c_int,
    pub create_cq: unsafe extern "C" fn(*mut Context, c_int, *mut c_void, *mut c_void, c_int) -> *mut Cq,
    pub destroy_cq: unsafe extern "C" fn(*mut Cq) -> c_int,
    pub create_qp: unsafe extern "C" fn(*mut Pd, *mut QpInitAttr) -> *mut Qp,
    pub modify_qp: unsafe extern "C" fn(*mut Qp, *mut QpAttr, c_int) -> c_int,
    pub destroy_qp: unsafe extern "C" fn(*mut Qp) -> c_int,
    pub query_port: unsafe extern "C" fn(*mut Context, u8, *mut PortAttr) -> c_int,
    pub query_gid: unsafe extern "C" fn(*mut Context, u8, c_int, *mut Gid) -> c_int,
    pub wc_status_str: unsafe extern "C" fn(c_uint) -> *const c_char,
    /// `ibv_is_fork_initialized` (rdma-core 35 and later).
    pub is_fork_initialized: Option<unsafe extern "C" fn() -> c_uint>,
    /// Keeps the functions above loaded.
    _lib: libloading::Library,
}

macro_rules! sym {
    ($lib:expr, $name:literal) => {{
        // SAFETY: the symbol is libibverbs' function of that name, whose prototype (rdma-core's
        // verbs.h, IBVERBS_1.1) is the field's type; the library stays loaded in `_lib`.
        let s = unsafe { $lib.get(concat!($name, "\0").as_bytes()) };
        *s.map_err(|e| VerbsError::Load(format!("{}: {e}", $name)))?
    }};
}

impl Library {
    /// Loads libibverbs: `OM_VERBS_LIB`, else its soname from the loader's path; refuses a
    /// kernel or library under which registered memory is not safe across `fork()` (the
    /// application may fork, and omd does to start restores).
    ///
    /// # Errors
    /// [`VerbsError::Load`] when it is missing or lacks a function, [`VerbsError::ForkUnsafe`].
    pub fn load() -> Result<Self, VerbsError> {
        let lib = Self::load_unchecked()?;
        if lib.fork_safe() {
            Ok(lib)
        } else {
            Err(VerbsError::ForkUnsafe)
        }
    }

    fn load_unchecked() -> Result<Self, VerbsError> {
        let path = std::env::var("OM_VERBS_LIB").unwrap_or_else(|_| SONAME.into());
        // SAFETY: loading libibverbs runs its initializers, which only read its configuration
        // (provider drivers are loaded later, by ibv_get_device_list).
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| VerbsError::Load(format!("{path}: {e} (is rdma-core's libibverbs1 installed?)")))?;
        Ok(Self {
            get_device_list: sym!(lib, "ibv_get_device_list"),
            free_device_list: sym!(lib, "ibv_free_device_list"),
            get_device_name: sym!(lib, "ibv_get_device_name"),
            open_device: sym!(lib, "ibv_open_device"),
            close_device: sym!(lib, "ibv_close_device"),
            alloc_pd: sym!(lib, "ibv_alloc_pd"),
            dealloc_pd: sym!(lib, "ibv_dealloc_pd"),
            reg_mr: sym!(lib, "ibv_reg_mr"),
            dereg_mr: sym!(lib, "ibv_dereg_mr"),
            create_cq: sym!(lib, "ibv_create_cq"),
            destroy_cq: sym!(lib, "ibv_destroy_cq"),
            create_qp: sym!(lib, "ibv_create_qp"),
            modify_qp: sym!(lib, "ibv_modify_qp"),
            destroy_qp: sym!(lib, "ibv_destroy_qp"),
            query_port: sym!(lib, "ibv_query_port"),
            query_gid: sym!(lib, "ibv_query_gid"),
            wc_status_str: sym!(lib, "ibv_wc_status_str"),
            // SAFETY: as for `sym!`: the function of that name and prototype, when it exists.
            is_fork_initialized: unsafe { lib.get(b"ibv_is_fork_initialized\0") }.ok().map(|s| *s),
            _lib: lib,
        })
    }

    /// True when registered memory needs no protection across `fork()`: the kernel copies pinned
    /// pages for the child instead of leaving the parent's writes to a fresh page the adapter does
    /// not see (Linux 5.13 and later; libibverbs says `IBV_FORK_UNNEEDED`).
    #[must_use]
    pub fn fork_safe(&self) -> bool {
        const IBV_FORK_UNNEEDED: c_uint = 2;
        // SAFETY: a function without arguments that reads the library's state.
        self.is_fork_initialized
            .is_some_and(|f| unsafe { f() } == IBV_FORK_UNNEEDED)
    }

    /// The library's name for a work completion status.
    #[must_use]
    pub fn status_name(&self, status: c_uint) -> String {
        // SAFETY: ibv_wc_status_str returns a static string for any value (an "unknown" one for
        // values it does not know).
        let p = unsafe { (self.wc_status_str)(status) };
        if p.is_null() {
            return format!("status {status}");
        }
        // SAFETY: a NUL-terminated static string of the library.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
