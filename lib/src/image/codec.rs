//! A little-endian byte writer and a bounds-checked reader for the image records.

/// Appends little-endian values.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// A `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Bytes with a `u32` length in front; longer inputs are the caller's bug and are cut.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.0.extend_from_slice(&b[..len as usize]);
        self
    }
}

/// Why a record did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes ended early.
    #[error("{0}: truncated")]
    Truncated(&'static str),
    /// A length over its cap.
    #[error("{what}: {len} bytes exceeds the cap of {max}")]
    Oversized {
        /// The field.
        what: &'static str,
        /// Its claimed length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A value that cannot be right.
    #[error("{0}")]
    Invalid(String),
}

/// Reads little-endian values, failing on truncation.
#[derive(Debug)]
pub struct Dec<'a>(pub &'a [u8]);

impl<'a> Dec<'a> {
    /// `n` raw bytes.
    ///
    /// # Errors
    /// Truncation.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    /// A `u32`.
    ///
    /// # Errors
    /// Truncation.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `u64`.
    ///
    /// # Errors
    /// Truncation.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Length-prefixed bytes of at most `max`.
    ///
    /// # Errors
    /// Truncation or a length over `max`.
    pub fn bytes(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(DecodeError::Oversized {
                what,
                len: len as u64,
                max: max as u64,
            });
        }
        self.take(len, what)
    }

    /// Fails unless everything was read.
    ///
    /// # Errors
    /// Trailing bytes.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Invalid(format!(
                "{what}: {} trailing bytes",
                self.0.len()
            )))
        }
    }
}
