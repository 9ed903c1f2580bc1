//! The cluster key: one secret file shared by every node of a cluster.
//!
//! Accepting a memory image means running code, so a node accepts pages only from peers that prove they
//! hold the key. The file must be private to its owner (no group or other permission bits), between
//! [`ClusterKey::MIN_LEN`] and [`ClusterKey::MAX_LEN`] bytes. Generate one with
//! `head -c 32 /dev/urandom > om.key && chmod 600 om.key`.

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error("cannot read cluster key {path}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Group or other users can access the file.
    #[error("cluster key {path} is accessible by other users (mode {mode:#o}); run `chmod 600 {path}`")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a regular file.
    #[error("cluster key {path} is not a regular file")]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// Too short to be a secret.
    #[error("cluster key {path} has {len} bytes; at least {min} are needed", min = ClusterKey::MIN_LEN)]
    TooShort {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Larger than any sensible key.
    #[error("cluster key {path} is larger than {max} bytes", max = ClusterKey::MAX_LEN)]
    TooLong {
        /// The key file.
        path: PathBuf,
    },
}

/// The cluster's shared secret. Its bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey {
    bytes: Vec<u8>,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({} bytes)", self.bytes.len())
    }
}

impl ClusterKey {
    /// The shortest key accepted: 128 bits.
    pub const MIN_LEN: usize = 16;
    /// The longest key accepted.
    pub const MAX_LEN: usize = 4096;

    /// Reads and checks a key file.
    ///
    /// # Errors
    /// A [`KeyError`] naming the file and what is wrong with it.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut bytes = Vec::new();
        // Read one byte past the cap so an oversized file is detected without reading all of it.
        let cap = u64::try_from(Self::MAX_LEN + 1).unwrap_or(u64::MAX);
        file.take(cap).read_to_end(&mut bytes).map_err(read_err)?;
        Self::from_bytes(bytes).map_err(|e| match e {
            KeyError::TooShort { len, .. } => KeyError::TooShort {
                path: path.to_path_buf(),
                len,
            },
            KeyError::TooLong { .. } => KeyError::TooLong {
                path: path.to_path_buf(),
            },
            other => other,
        })
    }

    /// A key from bytes already in memory (tests, launchers that hold the key themselves).
    ///
    /// # Errors
    /// [`KeyError::TooShort`] or [`KeyError::TooLong`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort {
                path: PathBuf::new(),
                len: bytes.len(),
            });
        }
        if bytes.len() > Self::MAX_LEN {
            return Err(KeyError::TooLong { path: PathBuf::new() });
        }
        Ok(Self { bytes })
    }

    /// The secret bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_key(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("om-key-test-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn accepts_private_key_and_hides_it() {
        let d = tempdir("ok");
        let p = write_key(&d, "k", &[7u8; 32], 0o600);
        let k = ClusterKey::load(&p).unwrap();
        assert_eq!(k.as_bytes(), &[7u8; 32]);
        assert_eq!(format!("{k:?}"), "ClusterKey(32 bytes)");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn refuses_bad_keys() {
        let d = tempdir("bad");
        let open = write_key(&d, "open", &[1u8; 32], 0o644);
        assert!(matches!(
            ClusterKey::load(&open),
            Err(KeyError::Permissions { mode: 0o644, .. })
        ));
        let short = write_key(&d, "short", &[1u8; 8], 0o600);
        assert!(matches!(
            ClusterKey::load(&short),
            Err(KeyError::TooShort { len: 8, .. })
        ));
        let long = write_key(&d, "long", &vec![1u8; ClusterKey::MAX_LEN + 10], 0o600);
        assert!(matches!(ClusterKey::load(&long), Err(KeyError::TooLong { .. })));
        assert!(matches!(
            ClusterKey::load(&d.join("missing")),
            Err(KeyError::Read { .. })
        ));
        assert!(matches!(
            ClusterKey::load(&d),
            Err(KeyError::NotAFile { .. }) | Err(KeyError::Permissions { .. })
        ));
        let msg = ClusterKey::load(&open).unwrap_err().to_string();
        assert!(msg.contains("chmod 600"), "{msg}");
        fs::remove_dir_all(d).unwrap();
    }
}
