//! What om can do, as the demo lists it. Every operation of the interface in `DESIGN.md` is built;
//! the transports a node can use depend on its libraries and devices (SISCI, libibverbs), which omd
//! finds at start.

use std::fmt;

/// An operation of om's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `omctl migrate`: live pre-copy migration.
    Migrate,
    /// `omctl checkpoint`: capture to a directory.
    Checkpoint,
    /// `omctl restart`: restore from a directory.
    Restart,
    /// `omctl ps`: the om processes of this node.
    ProcessList,
    /// `omd` accepting page streams from other nodes.
    PageServer,
    /// The runtime library preloaded into applications.
    Runtime,
    /// Migration over InfiniBand/RoCE verbs.
    Verbs,
    /// Migration over Dolphin SCI.
    Sci,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Migrate => "live migration (omctl migrate)",
            Self::Checkpoint => "checkpoint (omctl checkpoint)",
            Self::Restart => "restart (omctl restart)",
            Self::ProcessList => "process list (omctl ps)",
            Self::PageServer => "page server (omd accepting page streams)",
            Self::Runtime => "the in-process runtime (libomrt.so)",
            Self::Verbs => "migration over verbs (omctl migrate --transport verbs)",
            Self::Sci => "migration over Dolphin SCI (omctl migrate --transport sci)",
        })
    }
}

/// Every feature of this build.
pub const FEATURES: &[Feature] = &[
    Feature::Runtime,
    Feature::PageServer,
    Feature::Checkpoint,
    Feature::Restart,
    Feature::Migrate,
    Feature::ProcessList,
    Feature::Verbs,
    Feature::Sci,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_is_listed_once() {
        for f in [
            Feature::Migrate,
            Feature::Checkpoint,
            Feature::Restart,
            Feature::ProcessList,
            Feature::PageServer,
            Feature::Runtime,
            Feature::Verbs,
            Feature::Sci,
        ] {
            assert_eq!(FEATURES.iter().filter(|g| **g == f).count(), 1, "{f:?}");
        }
    }
}
