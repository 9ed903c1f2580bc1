//! The local control socket that `omd`, `omrun`, `omctl` and the runtime share.
//!
//! Every node runs one `omd` with a unix control socket. Its path is, in order: the `--control` option,
//! the `OM_CONTROL` environment variable, then a per-user default ([`default_socket_path`]).

use std::path::{Path, PathBuf};

/// The environment variable that may stand for `--control`.
pub const CONTROL_ENV: &str = "OM_CONTROL";

/// The per-user default control socket path.
///
/// root uses `/run/om/omd.sock`; any other user `$XDG_RUNTIME_DIR/om/omd.sock`, or
/// `/tmp/om-<uid>/omd.sock` when `XDG_RUNTIME_DIR` is not set.
#[must_use]
pub fn default_socket_path() -> PathBuf {
    let uid = nix::unistd::getuid();
    default_socket_path_for(
        uid.as_raw(),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref().map(Path::new),
    )
}

fn default_socket_path_for(uid: u32, runtime_dir: Option<&Path>) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/om/omd.sock");
    }
    match runtime_dir {
        Some(dir) if dir.is_absolute() => dir.join("om/omd.sock"),
        _ => PathBuf::from(format!("/tmp/om-{uid}/omd.sock")),
    }
}

/// Resolves the control socket path: the explicit option, else `OM_CONTROL`, else the default.
///
/// Command-line parsers already fold `OM_CONTROL` into the option (clap's `env`), so this mostly
/// supplies the default.
#[must_use]
pub fn resolve_socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(CONTROL_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => default_socket_path(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(default_socket_path_for(0, None), Path::new("/run/om/omd.sock"));
        assert_eq!(
            default_socket_path_for(1000, Some(Path::new("/run/user/1000"))),
            Path::new("/run/user/1000/om/omd.sock")
        );
        assert_eq!(
            default_socket_path_for(1000, None),
            Path::new("/tmp/om-1000/omd.sock")
        );
        // A relative XDG_RUNTIME_DIR is invalid per the XDG spec and ignored.
        assert_eq!(
            default_socket_path_for(7, Some(Path::new("rel"))),
            Path::new("/tmp/om-7/omd.sock")
        );
    }

    #[test]
    fn explicit_wins() {
        assert_eq!(
            resolve_socket_path(Some(Path::new("/x/y.sock"))),
            Path::new("/x/y.sock")
        );
    }
}
