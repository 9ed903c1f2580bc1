//! What om can do today, and the clear error for what it cannot do yet.
//!
//! The command-line tools parse the whole interface from `DESIGN.md` from day one, so scripts and tests
//! can be written against it. An operation whose machinery has not landed answers with [`Unavailable`],
//! which names the operation and the issue that builds it.

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

impl Feature {
    /// The issue in which this feature is built.
    #[must_use]
    pub const fn issue(self) -> u32 {
        match self {
            Self::Migrate | Self::ProcessList => 6,
            Self::Checkpoint | Self::Restart | Self::Runtime => 5,
            Self::PageServer => 4,
            Self::Verbs => 7,
            Self::Sci => 8,
        }
    }

    /// Whether the feature works in this build.
    #[must_use]
    pub fn available(self) -> bool {
        FEATURES.iter().any(|&(f, on)| f == self && on)
    }
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

/// Every feature and whether this build has it.
pub const FEATURES: &[(Feature, bool)] = &[
    (Feature::Runtime, true),
    (Feature::PageServer, true),
    (Feature::Checkpoint, true),
    (Feature::Restart, true),
    (Feature::Migrate, true),
    (Feature::ProcessList, true),
    (Feature::Verbs, true),
    (Feature::Sci, true),
];

/// The error for an operation whose machinery this build does not have yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{feature} is not built yet in om {version} (it lands with issue #{issue})", version = env!("CARGO_PKG_VERSION"), issue = feature.issue())]
pub struct Unavailable {
    /// What was asked for.
    pub feature: Feature,
}

impl Unavailable {
    /// The error for `feature`.
    #[must_use]
    pub const fn new(feature: Feature) -> Self {
        Self { feature }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_feature_and_issue() {
        let msg = Unavailable::new(Feature::Verbs).to_string();
        assert!(msg.contains("--transport verbs"), "{msg}");
        assert!(msg.contains("issue #7"), "{msg}");
    }

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
            assert_eq!(FEATURES.iter().filter(|(g, _)| *g == f).count(), 1, "{f:?}");
        }
    }
}
