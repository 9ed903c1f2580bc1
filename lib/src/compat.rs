//! The compatibility gate: can an image taken on one machine run on this one?
//!
//! A thread's registers and FPU state travel as its signal frame, laid out for the CPU features of
//! the machine it was taken on (`XCR0`, the xsave area size); `rt_sigreturn` on a machine that
//! enables other features would fail or worse. The vdso and vvar are the kernel's code and data in
//! the process: restore moves this machine's into the image's place, which is only sound when they
//! are the same code with the same layout. Restore checks this before anything is touched, and
//! migration before anything is frozen.

use om_transport::sys::crc32c;

use crate::dirty::maps;
use crate::image::records::{ProcessRecord, Special};
use crate::sys::task;

/// Why an image cannot run here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Incompatible {
    /// The xsave features or area size differ.
    #[error(
        "the image was taken on a CPU with xsave features {image_xcr0:#x} ({image_size} bytes); this \
         machine has {here_xcr0:#x} ({here_size} bytes)"
    )]
    Xsave {
        /// The image's `XCR0`.
        image_xcr0: u64,
        /// The image's xsave area size.
        image_size: u32,
        /// This machine's `XCR0`.
        here_xcr0: u64,
        /// This machine's xsave area size.
        here_size: u32,
    },
    /// The kernel-provided mappings have another layout.
    #[error("the vdso/vvar layout differs: the image has {image}, this kernel has {here}")]
    VdsoLayout {
        /// The image's layout.
        image: String,
        /// This machine's layout.
        here: String,
    },
    /// The vdso is other code (another kernel).
    #[error("the vdso differs from the image's (checksum {image:#010x}, here {here:#010x}): another kernel")]
    VdsoCode {
        /// The image's vdso checksum.
        image: u32,
        /// This machine's.
        here: u32,
    },
    /// This machine's own layout could not be read.
    #[error("reading this process's memory map: {0}")]
    Local(String),
}

/// What this machine offers, as the gate compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// `XCR0`.
    pub xcr0: u64,
    /// The xsave area size.
    pub xsave_size: u32,
    /// This process's vdso and vvar mappings, in address order.
    pub specials: Vec<Special>,
    /// CRC-32C of this process's vdso.
    pub vdso_sum: u32,
}

impl Local {
    /// Probes this machine (through this process).
    ///
    /// # Errors
    /// `/proc/self/maps` could not be read.
    pub fn probe() -> Result<Self, Incompatible> {
        let vmas = maps::read_self().map_err(|e| Incompatible::Local(e.to_string()))?;
        let mut specials = Vec::new();
        let mut vdso_sum = 0;
        for v in vmas.iter().filter(|v| v.is_special() && v.end <= USER_END) {
            if v.path == "[vdso]" {
                vdso_sum = crc32c(task::vdso_bytes(v.start, v.len()));
            }
            specials.push(Special {
                name: v.path.clone(),
                start: v.start,
                end: v.end,
            });
        }
        Ok(Self {
            xcr0: task::xcr0(),
            xsave_size: task::xsave_size(),
            specials,
            vdso_sum,
        })
    }

    /// Checks that an image taken with `process` can run here.
    ///
    /// # Errors
    /// The first difference found.
    pub fn check(&self, process: &ProcessRecord) -> Result<(), Incompatible> {
        if process.xcr0 != self.xcr0 || process.xsave_size != self.xsave_size {
            return Err(Incompatible::Xsave {
                image_xcr0: process.xcr0,
                image_size: process.xsave_size,
                here_xcr0: self.xcr0,
                here_size: self.xsave_size,
            });
        }
        let image = layout(&process.specials);
        let here = layout(&self.specials);
        if image != here {
            return Err(Incompatible::VdsoLayout { image, here });
        }
        if process.vdso_sum != self.vdso_sum {
            return Err(Incompatible::VdsoCode {
                image: process.vdso_sum,
                here: self.vdso_sum,
            });
        }
        Ok(())
    }
}

/// The highest user address on x86-64 with 4-level page tables (`[vsyscall]` lies above).
pub const USER_END: u64 = 0x7fff_ffff_f000;

/// A layout as names, sizes and the distances between the mappings (positions themselves differ
/// from process to process).
fn layout(specials: &[Special]) -> String {
    let base = specials.first().map_or(0, |s| s.start);
    let parts: Vec<String> = specials
        .iter()
        .map(|s| format!("{}+{:#x}:{:#x}", s.name, s.start - base, s.end - s.start))
        .collect();
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_is_compatible_with_itself() {
        let here = Local::probe().unwrap();
        assert!(here.specials.iter().any(|s| s.name == "[vdso]"));
        assert_ne!(here.vdso_sum, 0);
        let p = ProcessRecord {
            xcr0: here.xcr0,
            xsave_size: here.xsave_size,
            specials: here.specials.clone(),
            vdso_sum: here.vdso_sum,
            ..ProcessRecord::default()
        };
        here.check(&p).unwrap();
    }

    #[test]
    fn each_difference_is_named() {
        let here = Local::probe().unwrap();
        let good = ProcessRecord {
            xcr0: here.xcr0,
            xsave_size: here.xsave_size,
            specials: here.specials.clone(),
            vdso_sum: here.vdso_sum,
            ..ProcessRecord::default()
        };
        let mut p = good.clone();
        p.xsave_size += 64;
        assert!(matches!(here.check(&p), Err(Incompatible::Xsave { .. })));
        let mut p = good.clone();
        p.vdso_sum ^= 1;
        assert!(matches!(here.check(&p), Err(Incompatible::VdsoCode { .. })));
        let mut p = good.clone();
        p.specials[0].end += 4096;
        let e = here.check(&p).unwrap_err();
        assert!(e.to_string().contains("layout differs"), "{e}");
        // The same layout elsewhere in the address space is fine.
        let mut p = good;
        for s in &mut p.specials {
            s.start += 1 << 30;
            s.end += 1 << 30;
        }
        here.check(&p).unwrap();
    }
}
