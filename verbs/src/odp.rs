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
use crate::sys::Device;
use crate::sys::abi::{ODP_SUPPORT, ODP_SUPPORT_SEND, ODP_SUPPORT_WRITE, OdpCaps, RXE_VENDOR_ID};

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
    /// Why om does not take what the device says it offers, if it does not.
    pub withheld: Option<&'static str>,
}

/// Why om does not use soft-RoCE's ODP below a page-sized MTU.
pub const RXE_SMALL_MTU: &str = "soft-RoCE's on-demand copy ignores where in a page a packet starts (seen up to Linux 7.3), which only a path MTU of a whole page avoids: raise the network device's MTU (4096 needs an Ethernet MTU above 4096)";

impl Offer {
    /// From the device's capabilities.
    #[must_use]
    pub fn of(caps: &OdpCaps) -> Self {
        let any = caps.general_caps & ODP_SUPPORT != 0;
        Self {
            source: any && caps.rc_odp_caps & ODP_SUPPORT_SEND != 0,
            target: any && caps.rc_odp_caps & ODP_SUPPORT_WRITE != 0,
            withheld: None,
        }
    }

    /// From a port's device: its capabilities, less what om knows to be broken. soft-RoCE
    /// (`vendor_id` [`RXE_VENDOR_ID`]) copies each packet to or from the start of its page,
    /// whatever its offset in the page, so its ODP is only sound when every packet is a whole,
    /// page-aligned page: an active MTU (`enum ibv_mtu`) of at least `page_size` (om's transfers
    /// are page-aligned). The copy was measured wrong in 3 of 4 KiB of every page at MTU 1024, and
    /// right at 4096, in both directions.
    #[must_use]
    pub fn of_port(caps: &OdpCaps, vendor_id: u32, active_mtu: u32, page_size: u64) -> Self {
        let offer = Self::of(caps);
        let mtu = if (1..=5).contains(&active_mtu) {
            128u64 << active_mtu
        } else {
            0
        };
        if vendor_id == RXE_VENDOR_ID && mtu < page_size && (offer.source || offer.target) {
            return Self {
                source: false,
                target: false,
                withheld: Some(RXE_SMALL_MTU),
            };
        }
        offer
    }

    /// What `dev` offers, as [`Offer::of_port`] judges it for a path to a peer whose port has
    /// MTU `peer_mtu` (a queue pair's path MTU is the smaller of the two; `None`: not known yet,
    /// this port's own).
    #[must_use]
    pub fn of_path(dev: &Device, peer_mtu: Option<u32>) -> Self {
        let own = dev.attr.active_mtu;
        Self::of_port(
            &dev.odp,
            dev.vendor_id,
            peer_mtu.map_or(own, |p| own.min(p)),
            om_transport::sys::page_size() as u64,
        )
    }

    fn refusal(self, device: &str, what: &'static str) -> VerbsError {
        VerbsError::NoOdp {
            device: device.into(),
            what,
            why: self.withheld.map_or_else(String::new, |w| format!(": {w}")),
        }
    }
}

/// What the device that serves `local` (as [`crate::sys::Device::open`] chooses it) offers.
///
/// # Errors
/// No libibverbs, or no usable device.
pub fn offered(local: Option<std::net::IpAddr>) -> Result<Offer, VerbsError> {
    let lib = std::sync::Arc::new(crate::sys::Library::load()?);
    let dev = Device::open(lib, local)?;
    Ok(Offer::of_path(&dev, None))
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
        OdpSetting::On => Err(offer.refusal(device, "the targets of RDMA WRITE")),
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
        OdpSetting::On => Err(offer.refusal(device, "the sources of sends and RDMA WRITEs")),
        _ if pinning_fits => Ok(false),
        OdpSetting::Auto if offer.source => Ok(true),
        _ => Err(VerbsError::Memlock { limit: budget, need }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Offer = Offer {
        source: true,
        target: true,
        withheld: None,
    };
    const NONE: Offer = Offer {
        source: false,
        target: false,
        withheld: None,
    };

    #[test]
    fn settings_parse_and_refuse_other_words() {
        assert_eq!(OdpSetting::parse(None).ok(), Some(OdpSetting::Auto));
        assert_eq!(OdpSetting::parse(Some("")).ok(), Some(OdpSetting::Auto));
        assert_eq!(OdpSetting::parse(Some("on")).ok(), Some(OdpSetting::On));
        assert_eq!(OdpSetting::parse(Some(" off ")).ok(), Some(OdpSetting::Off));
        let e = OdpSetting::parse(Some("yes")).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("OM_VERBS_ODP is auto, on or off, not \"yes\""));
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
                target: true,
                withheld: None
            }
        );
    }

    #[test]
    fn soft_roce_below_a_page_sized_mtu_offers_nothing() {
        let caps = OdpCaps {
            general_caps: ODP_SUPPORT,
            rc_odp_caps: ODP_SUPPORT_SEND | ODP_SUPPORT_WRITE,
            ..OdpCaps::default()
        };
        let (mtu_1024, mtu_4096) = (3, 5);
        let rxe = |mtu, page| Offer::of_port(&caps, RXE_VENDOR_ID, mtu, page);
        assert_eq!(rxe(mtu_4096, 4096), BOTH);
        let small = rxe(mtu_1024, 4096);
        assert!(!small.source && !small.target);
        assert_eq!(small.withheld, Some(RXE_SMALL_MTU));
        assert!(
            !rxe(mtu_4096, 16384).target,
            "16 KiB pages need more than any MTU"
        );
        assert_eq!(
            Offer::of_port(&caps, 0x02c9, mtu_1024, 4096),
            BOTH,
            "other vendors as they say"
        );
        let e = for_export(OdpSetting::On, small, "rxe0")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("rxe0") && m.contains("MTU")));
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
            Err(VerbsError::Memlock { limit: 99, need: 100 })
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
