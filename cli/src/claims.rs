//! The home's decisions on migrations in doubt ([`om_transport::relay`]): for each commit token, whether
//! its copy may run. The first claim for a token decides it; every later claim gets the same answer.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// Decisions, oldest first, at most [`om_transport::wire::MAX_FATES`] (a source asks within seconds
/// of its `Go`; a destination claims as it starts the copy).
#[derive(Debug, Default)]
pub struct Claims(Mutex<VecDeque<(u64, bool)>>);

impl Claims {
    /// Decides `token` by this claim (`start`: the copy runs; else it never may) unless an earlier
    /// claim did; returns the decision.
    pub fn claim(&self, token: u64, start: bool) -> bool {
        let mut d = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&(_, started)) = d.iter().find(|(t, _)| *t == token) {
            return started;
        }
        if d.len() >= om_transport::wire::MAX_FATES {
            d.pop_front();
        }
        d.push_back((token, start));
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_decides_for_good() {
        let c = Claims::default();
        assert!(c.claim(7, true));
        assert!(c.claim(7, false), "a later cancel learns the copy runs");
        assert!(!c.claim(8, false));
        assert!(!c.claim(8, true), "a later start learns it was cancelled");
        assert!(c.claim(7, true));
    }

    #[test]
    fn it_remembers_the_latest_decisions_only() {
        let c = Claims::default();
        let n = om_transport::wire::MAX_FATES as u64;
        for t in 0..=n {
            assert!(!c.claim(t, false));
        }
        // Token 0 was forgotten: a new claim decides it afresh; the newest are still held.
        assert!(c.claim(0, true));
        assert!(!c.claim(n, true));
    }
}
