//! A queue pair's address, as the two sides exchange it over the authenticated control connection:
//! the receiver's in its `Placement`, the sender's in its `Attach`.
//!
//! Layout (little endian, 48 bytes): magic `"omRC"`, version 1, queue pair number, first packet
//! sequence number (24 bits), LID, path MTU (1..=5), GID (16 bytes), and the receiver's image base
//! address (the remote address of window 0; zero from the sender).

use crate::error::VerbsError;
use crate::sys::abi::Gid;

/// The endpoint blob's length.
pub const LEN: usize = 48;
const MAGIC: &[u8; 4] = b"omRC";
const VERSION: u16 = 1;

/// A queue pair's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active path MTU, as `enum ibv_mtu` (1 = 256 bytes .. 5 = 4096).
    pub mtu: u32,
    /// Port GID (the IP address on RoCE).
    pub gid: Gid,
    /// Remote address of window 0 of the receiver's image memory (0 from a sender).
    pub base: u64,
}

impl Endpoint {
    /// The wire bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.qpn.to_le_bytes());
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.extend_from_slice(&self.mtu.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.gid.0);
        out.extend_from_slice(&self.base.to_le_bytes());
        out
    }

    /// Decodes and checks an endpoint from a peer.
    ///
    /// # Errors
    /// [`VerbsError::Endpoint`]: wrong length, magic or version, or a field out of range.
    pub fn decode(b: &[u8]) -> Result<Self, VerbsError> {
        let bad = |why: &str| VerbsError::Endpoint(why.into());
        let b: &[u8; LEN] = b.try_into().map_err(|_| bad("wrong length"))?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if &b[..4] != MAGIC || u16_at(4) != VERSION {
            return Err(bad("not an om verbs endpoint of version 1"));
        }
        let e = Self {
            lid: u16_at(6),
            qpn: u32_at(8),
            psn: u32_at(12),
            mtu: u32_at(16),
            gid: Gid(b[24..40].try_into().unwrap_or_default()),
            base: u64::from_le_bytes(b[40..48].try_into().unwrap_or_default()),
        };
        if e.qpn >= 1 << 24 || e.psn >= 1 << 24 || !(1..=5).contains(&e.mtu) || u32_at(20) != 0 {
            return Err(bad(
                "queue pair number, sequence number, MTU or reserved bytes out of range",
            ));
        }
        Ok(e)
    }
}

/// A random first packet sequence number (24 bits), so that a stale packet of an earlier connection
/// that reused the queue pair number is not taken for one of this connection.
#[must_use]
pub fn random_psn() -> u32 {
    u32::from_le_bytes(om_transport::auth::random_bytes()) & 0xff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(qpn in 0u32..1 << 24, psn in 0u32..1 << 24, lid: u16, mtu in 1u32..=5, gid: [u8; 16], base: u64) {
            let e = Endpoint { qpn, psn, lid, mtu, gid: Gid(gid), base };
            prop_assert_eq!(Endpoint::decode(&e.encode()).unwrap(), e);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Endpoint::decode(&b);
        }
    }

    #[test]
    fn refuses_bad_fields() {
        let good = Endpoint {
            qpn: 17,
            psn: 5,
            lid: 0,
            mtu: 3,
            gid: Gid([1; 16]),
            base: 4096,
        };
        let mut b = good.encode();
        b[0] = b'x';
        assert!(Endpoint::decode(&b).is_err());
        for (at, v) in [(8, 0xff_u8), (16, 9), (20, 1)] {
            let mut b = good.encode();
            b[at + if at == 8 { 3 } else { 0 }] = v;
            assert!(Endpoint::decode(&b).is_err(), "byte {at}");
        }
        assert!(Endpoint::decode(&good.encode()[..47]).is_err());
    }
}
