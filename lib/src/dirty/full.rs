//! The "none" mechanism: no tracking at all. Every populated page is dirty every round, so a
//! migration with it is stop-and-copy. Always available; the baseline every other mechanism is
//! measured against.

use std::fs::File;

use super::maps;
use super::populated::{DEFAULT_MARKER_SWAP_TYPE, PopulatedQuery, ZeroWatch};
use super::{DirtyError, Mechanism, RangeTable, Round, Scope, Tracker, tracked_table};

/// See the module documentation.
#[derive(Debug)]
pub struct FullTracker {
    scope: Scope,
    pagemap: File,
    populated: PopulatedQuery,
    zero: ZeroWatch,
}

impl FullTracker {
    /// # Errors
    /// [`DirtyError::PagemapOpen`].
    pub fn new(scope: Scope) -> Result<Self, DirtyError> {
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::PagemapOpen)?;
        let populated = PopulatedQuery::new(&pagemap, DEFAULT_MARKER_SWAP_TYPE);
        Ok(Self {
            scope,
            pagemap,
            populated,
            zero: ZeroWatch::default(),
        })
    }
}

impl Tracker for FullTracker {
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        vec![self.pagemap.as_raw_fd()]
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::Full
    }

    fn start(&mut self) -> Result<RangeTable, DirtyError> {
        let tracked = tracked_table(&maps::read_self()?, &self.scope);
        let dirty = self.populated.over(&self.pagemap, &tracked)?;
        self.zero.begin(&dirty);
        Ok(dirty)
    }

    fn collect(&mut self) -> Result<Round, DirtyError> {
        let tracked = tracked_table(&maps::read_self()?, &self.scope);
        let dirty = self.populated.over(&self.pagemap, &tracked)?;
        let zeroed = self.zero.round(&tracked, &dirty);
        Ok(Round { dirty, zeroed })
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }
}
