//! On-demand paging (ODP): registrations that pin nothing. The adapter faults pages in as it touches
//! them and the kernel's MMU notifiers keep it in step with the process's mappings, so an ODP
//! registration costs no locked memory (`RLIMIT_MEMLOCK` does not count it) and no pinning pass.
//!
//! Where om uses it (`OM_VERBS_ODP`: `auto`, the default, `on` or `off`):
//!
//! - **omd's exported image memory**: on demand wherever the device offers ODP for RDMA WRITE
//!   targets. omd owns that memory and never unmaps it while it is exported, so nothing can go
//!   wrong, and it gains everything: each window is registered whole, once, whatever the memory
//!   limit, and zero or dropped pages are released instead of overwritten (no pin holds them).
//! - **The sender's registrations** (the application's memory and the staging buffer): pinned
//!   unless pinning cannot work at all (`RLIMIT_MEMLOCK` below the staging buffer plus one
//!   registration window), then on demand where the device offers it for sends. A pinned page
//!   stays readable when the application unmaps it mid-round (it comes back as a suspect and goes
//!   again); under ODP the adapter's read of an unmapped page fails the request with a protection
//!   error, which breaks the queue pair and with it the migration (cleanly: the process runs on).
//!   `on` uses ODP for the sender whenever the device offers it.
//!
//! `on` fails clearly where the device does not offer what is needed; `off` always pins.

use crate::error::VerbsError;
use crate::sys::abi::{ODP_SUPPORT, ODP_SUPPORT_SEND, ODP_SUPPORT_WRITE, OdpCaps};

/// What `OM_VERBS_ODP` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OdpSetting {
    /// On demand where it cannot hurt (the default).
    #[default]
    Auto,
    /// On demand on both sides; an error where the device does not offer it.
    On,
    /// Always pinned.
    Off,
}

impl OdpSetting {
    /// The variable's value (unset or empty: `auto`).
    ///
    /// # Errors
    /// [`VerbsError::Setting`] for any other word.
    pub fn parse(value: Option<&str>) -> Result<Self, VerbsError> {
        match value.map(str::trim) {
            None | Some("" | "auto") => Ok(Self::Auto),
            Some("on") => Ok(Self::On),
            Some("off") => Ok(Self::Off),
            Some(other) => Err(VerbsError::Setting {
                name: "OM_VERBS_ODP",
                value: other.into(),
                allowed: "auto, on or off",
            }),
        }
    }

    /// `OM_VERBS_ODP` from the environment.
    ///
    /// # Errors
    /// As [`OdpSetting::parse`].
    pub fn from_env() -> Result<Self, VerbsError> {
        Self::parse(std::env::var("OM_VERBS_ODP").ok().as_deref())
    }
}

/// What a device offers of ODP on reliable connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offer {
    /// Its requests (sends and RDMA WRITEs) may read on-demand memory.
    pub source: bool,
    /// RDMA WRITEs from the peer may land in on-demand memory.
    pub target: bool,
}

impl Offer {
    /// From the device's capabilities.
    #[must_use]
    pub fn of(caps: &OdpCaps) -> Self {
        let any = caps.general_caps & ODP_SUPPORT != 0;
        Self {
            source: any && caps.rc_odp_caps & ODP_SUPPORT_SEND != 0,
            target: any && caps.rc_odp_caps & ODP_SUPPORT_WRITE != 0,
        }
    }
}

/// Whether omd registers an exported image's memory on demand.
///
/// # Errors
/// [`VerbsError::NoOdp`] for `on` where `device` offers no ODP for RDMA WRITE targets.
pub fn for_export(setting: OdpSetting, offer: Offer, device: &str) -> Result<bool, VerbsError> {
    match setting {
        OdpSetting::Auto => Ok(offer.target),
        OdpSetting::Off => Ok(false),
        OdpSetting::On if offer.target => Ok(true),
        OdpSetting::On => Err(VerbsError::NoOdp {
            device: device.into(),
            what: "the targets of RDMA WRITE",
        }),
    }
}

/// Whether the sender registers on demand, given its locked-memory `budget` and the `need` of
/// the pinned way (the staging buffer, headroom and one registration window).
///
/// # Errors
/// [`VerbsError::NoOdp`] for `on` where `device` offers no ODP for sends; [`VerbsError::Memlock`]
/// where pinning cannot work and ODP is not there (or `off`).
pub fn for_sender(
    setting: OdpSetting,
    offer: Offer,
    budget: u64,
    need: u64,
    device: &str,
) -> Result<bool, VerbsError> {
    let pinning_fits = budget >= need;
    match setting {
        OdpSetting::On if offer.source => Ok(true),
        OdpSetting::On => Err(VerbsError::NoOdp {
            device: device.into(),
            what: "the sources of sends and RDMA WRITEs",
        }),
        _ if pinning_fits => Ok(false),
        OdpSetting::Auto if offer.source => Ok(true),
        _ => Err(VerbsError::Memlock {
            limit: budget,
            need,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Offer = Offer {
        source: true,
        target: true,
    };
    const NONE: Offer = Offer {
        source: false,
        target: false,
    };

    #[test]
    fn settings_parse_and_refuse_other_words() {
        assert_eq!(OdpSetting::parse(None).ok(), Some(OdpSetting::Auto));
        assert_eq!(OdpSetting::parse(Some("")).ok(), Some(OdpSetting::Auto));
        assert_eq!(OdpSetting::parse(Some("on")).ok(), Some(OdpSetting::On));
        assert_eq!(OdpSetting::parse(Some(" off ")).ok(), Some(OdpSetting::Off));
        let e = OdpSetting::parse(Some("yes")).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("OM_VERBS_ODP is auto, on or off, not \"yes\"")
        );
    }

    #[test]
    fn offers_need_the_general_bit_and_the_transport_bit() {
        let caps = |general, rc| OdpCaps {
            general_caps: general,
            rc_odp_caps: rc,
            ..OdpCaps::default()
        };
        assert_eq!(Offer::of(&caps(0, !0)), NONE);
        assert_eq!(Offer::of(&caps(ODP_SUPPORT, 0)), NONE);
        assert_eq!(Offer::of(&caps(ODP_SUPPORT, 0b1111)), BOTH);
        assert_eq!(
            Offer::of(&caps(ODP_SUPPORT, ODP_SUPPORT_WRITE)),
            Offer {
                source: false,
                target: true
            }
        );
    }

    #[test]
    fn exports_go_on_demand_wherever_offered() {
        assert!(matches!(for_export(OdpSetting::Auto, BOTH, "d"), Ok(true)));
        assert!(matches!(for_export(OdpSetting::Auto, NONE, "d"), Ok(false)));
        assert!(matches!(for_export(OdpSetting::Off, BOTH, "d"), Ok(false)));
        assert!(matches!(for_export(OdpSetting::On, BOTH, "d"), Ok(true)));
        assert!(matches!(
            for_export(OdpSetting::On, NONE, "d"),
            Err(VerbsError::NoOdp { .. })
        ));
    }

    #[test]
    fn senders_pin_unless_pinning_cannot_work_or_odp_is_asked_for() {
        let s = |setting, offer, budget| for_sender(setting, offer, budget, 100, "d");
        assert!(matches!(s(OdpSetting::Auto, BOTH, u64::MAX), Ok(false)));
        assert!(matches!(s(OdpSetting::Auto, BOTH, 100), Ok(false)));
        assert!(matches!(s(OdpSetting::Auto, BOTH, 99), Ok(true)));
        assert!(matches!(
            s(OdpSetting::Auto, NONE, 99),
            Err(VerbsError::Memlock {
                limit: 99,
                need: 100
            })
        ));
        assert!(matches!(s(OdpSetting::On, BOTH, u64::MAX), Ok(true)));
        assert!(matches!(
            s(OdpSetting::On, NONE, u64::MAX),
            Err(VerbsError::NoOdp { .. })
        ));
        assert!(matches!(s(OdpSetting::Off, BOTH, u64::MAX), Ok(false)));
        assert!(matches!(
            s(OdpSetting::Off, BOTH, 99),
            Err(VerbsError::Memlock { .. })
        ));
    }
}
