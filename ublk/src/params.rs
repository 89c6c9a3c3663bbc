//! Device parameters (`SET_PARAMS`/`GET_PARAMS`): what the block layer is told about a
//! device — size, block sizes, IO limits, cache/FUA, discard and write-zeroes.
//!
//! Owns the encoding to and from `sys::ublk_params` and a validation that refuses, with a
//! reason, everything `ublk_validate_params` (6.12 and 7.x) would refuse with a bare
//! EINVAL — except `max_sectors` against the device's `max_io_buf_bytes`, which only
//! `Control::set_params` can check.

use crate::sys;
use crate::Error;

const SECTOR_SHIFT: u8 = 9;
/// The kernel refuses logical blocks larger than a page; x86_64 and our arm64 builds use
/// 4 KiB pages.
const MAX_LOGICAL_BS_SHIFT: u8 = 12;
/// Sizes the kernel computes as `1 << shift` in an `unsigned int`.
const MAX_SHIFT: u8 = 30;
/// The block layer refuses a max transfer below one page.
const MIN_MAX_SECTORS: u32 = 4096 >> SECTOR_SHIFT;
const DMA_ALIGN_LIMIT: u32 = 4096;

/// Parameters of a ublk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Size in 512-byte sectors.
    pub dev_sectors: u64,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    /// Minimum IO size the device prefers (io_min), as a shift.
    pub io_min_shift: u8,
    /// Optimal IO size (io_opt), as a shift.
    pub io_opt_shift: u8,
    /// Largest request in sectors; at most the device's `max_io_buf_bytes / 512`.
    pub max_sectors: u32,
    /// The device has a volatile write cache: the kernel sends FLUSH.
    pub volatile_cache: bool,
    /// The device honours FUA writes (needs `volatile_cache`).
    pub fua: bool,
    pub read_only: bool,
    pub rotational: bool,
    /// Discard and write-zeroes limits; `None`: neither is supported.
    pub discard: Option<Discard>,
    /// DMA alignment mask (`alignment - 1`), 0 = the default (511). Ignored by kernels
    /// before 6.14.
    pub dma_align_mask: u32,
}

/// Discard and write-zeroes limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard {
    /// Byte offset of the first aligned discard unit.
    pub alignment: u32,
    /// Discard unit in bytes.
    pub granularity: u32,
    /// 0: discard not supported (write-zeroes may still be).
    pub max_discard_sectors: u32,
    /// 0: write-zeroes not supported.
    pub max_write_zeroes_sectors: u32,
    /// The driver supports one segment per discard.
    pub max_discard_segments: u16,
}

fn invalid(msg: String) -> Error {
    Error::InvalidParams(msg)
}

impl Params {
    /// The kernel struct, with `len` set for the newest layout (older kernels clamp it).
    pub fn encode(&self) -> sys::ublk_params {
        let mut attrs = 0;
        if self.read_only {
            attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        if self.rotational {
            attrs |= sys::UBLK_ATTR_ROTATIONAL;
        }
        if self.volatile_cache {
            attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        }
        if self.fua {
            attrs |= sys::UBLK_ATTR_FUA;
        }
        let mut p = sys::ublk_params {
            len: params_len(),
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: sys::ublk_param_basic {
                attrs,
                logical_bs_shift: self.logical_bs_shift,
                physical_bs_shift: self.physical_bs_shift,
                io_opt_shift: self.io_opt_shift,
                io_min_shift: self.io_min_shift,
                max_sectors: self.max_sectors,
                chunk_sectors: 0,
                dev_sectors: self.dev_sectors,
                virt_boundary_mask: 0,
            },
            ..Default::default()
        };
        if let Some(d) = &self.discard {
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard = sys::ublk_param_discard {
                discard_alignment: d.alignment,
                discard_granularity: d.granularity,
                max_discard_sectors: d.max_discard_sectors,
                max_write_zeroes_sectors: d.max_write_zeroes_sectors,
                max_discard_segments: d.max_discard_segments,
                reserved0: 0,
            };
        }
        if self.dma_align_mask != 0 {
            p.types |= sys::UBLK_PARAM_TYPE_DMA_ALIGN;
            p.dma.alignment = self.dma_align_mask;
        }
        p
    }

    /// The parameters in a kernel struct (as GET_PARAMS returns them). Sections whose
    /// type bit is clear read as absent.
    pub fn decode(p: &sys::ublk_params) -> Self {
        let b = &p.basic;
        let discard = (p.types & sys::UBLK_PARAM_TYPE_DISCARD != 0).then_some(Discard {
            alignment: p.discard.discard_alignment,
            granularity: p.discard.discard_granularity,
            max_discard_sectors: p.discard.max_discard_sectors,
            max_write_zeroes_sectors: p.discard.max_write_zeroes_sectors,
            max_discard_segments: p.discard.max_discard_segments,
        });
        let dma_align_mask = if p.types & sys::UBLK_PARAM_TYPE_DMA_ALIGN != 0 {
            p.dma.alignment
        } else {
            0
        };
        Params {
            dev_sectors: b.dev_sectors,
            logical_bs_shift: b.logical_bs_shift,
            physical_bs_shift: b.physical_bs_shift,
            io_min_shift: b.io_min_shift,
            io_opt_shift: b.io_opt_shift,
            max_sectors: b.max_sectors,
            volatile_cache: b.attrs & sys::UBLK_ATTR_VOLATILE_CACHE != 0,
            fua: b.attrs & sys::UBLK_ATTR_FUA != 0,
            read_only: b.attrs & sys::UBLK_ATTR_READ_ONLY != 0,
            rotational: b.attrs & sys::UBLK_ATTR_ROTATIONAL != 0,
            discard,
            dma_align_mask,
        }
    }

    /// Refuses what the kernel would refuse, and nonsense it would accept, with a reason.
    pub fn validate(&self) -> Result<(), Error> {
        let lbs = self.logical_bs_shift;
        if !(SECTOR_SHIFT..=MAX_LOGICAL_BS_SHIFT).contains(&lbs) {
            return Err(invalid(format!(
                "logical block size 2^{lbs} bytes: must be 512 to 4096 bytes (shift 9..=12)"
            )));
        }
        if self.physical_bs_shift < lbs || self.physical_bs_shift > MAX_SHIFT {
            return Err(invalid(format!(
                "physical block size 2^{} bytes: must be at least the logical block size 2^{lbs} (and shift <= {MAX_SHIFT})",
                self.physical_bs_shift
            )));
        }
        if self.io_min_shift < lbs || self.io_min_shift > MAX_SHIFT {
            return Err(invalid(format!(
                "io_min 2^{} bytes: must be at least the logical block size 2^{lbs} (and shift <= {MAX_SHIFT})",
                self.io_min_shift
            )));
        }
        if self.io_opt_shift < self.io_min_shift || self.io_opt_shift > MAX_SHIFT {
            return Err(invalid(format!(
                "io_opt 2^{} bytes: must be at least io_min 2^{} (and shift <= {MAX_SHIFT})",
                self.io_opt_shift, self.io_min_shift
            )));
        }
        if self.dev_sectors == 0 {
            return Err(invalid(
                "device size 0 sectors: a device needs at least one block".into(),
            ));
        }
        let lbs_sectors = 1u64 << (lbs - SECTOR_SHIFT);
        if !self.dev_sectors.is_multiple_of(lbs_sectors) {
            return Err(invalid(format!(
                "device size {} sectors is not a whole number of {}-byte logical blocks",
                self.dev_sectors,
                1u32 << lbs
            )));
        }
        if self.max_sectors < MIN_MAX_SECTORS {
            return Err(invalid(format!(
                "max_sectors {}: must be at least {MIN_MAX_SECTORS} (one 4 KiB page)",
                self.max_sectors
            )));
        }
        if self.fua && !self.volatile_cache {
            return Err(invalid(
                "FUA without a volatile write cache means nothing to the block layer; set volatile_cache or clear fua".into(),
            ));
        }
        if let Some(d) = &self.discard {
            if d.granularity == 0 || !d.granularity.is_multiple_of(1u32 << lbs) {
                return Err(invalid(format!(
                    "discard granularity {} bytes: must be a non-zero multiple of the logical block size {}",
                    d.granularity,
                    1u32 << lbs
                )));
            }
            if d.max_discard_sectors != 0 && d.max_discard_segments != 1 {
                return Err(invalid(format!(
                    "max_discard_segments {}: the ublk driver supports exactly 1 segment per discard",
                    d.max_discard_segments
                )));
            }
            if !d.alignment.is_multiple_of(1u32 << lbs) {
                return Err(invalid(format!(
                    "discard alignment {} bytes: must be a multiple of the logical block size {}",
                    d.alignment,
                    1u32 << lbs
                )));
            }
        }
        let mask = self.dma_align_mask;
        if mask != 0 && (mask >= DMA_ALIGN_LIMIT || !(mask + 1).is_power_of_two()) {
            return Err(invalid(format!(
                "dma_align_mask {mask:#x}: must be 2^n - 1 and below the page size (or 0 for the default)"
            )));
        }
        Ok(())
    }

    /// Device size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.dev_sectors << SECTOR_SHIFT
    }
}

/// `size_of::<sys::ublk_params>()` as the `len` field wants it.
pub(crate) fn params_len() -> u32 {
    const LEN: usize = std::mem::size_of::<sys::ublk_params>();
    const _: () = assert!(LEN <= u16::MAX as usize);
    #[allow(clippy::cast_possible_truncation)] // asserted above
    let len = LEN as u32;
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Params {
        Params {
            dev_sectors: 2 << 21, // 2 GiB
            logical_bs_shift: 12,
            physical_bs_shift: 12,
            io_min_shift: 12,
            io_opt_shift: 20,
            max_sectors: 1024,
            volatile_cache: true,
            fua: true,
            read_only: false,
            rotational: false,
            discard: Some(Discard {
                alignment: 0,
                granularity: 1 << 20,
                max_discard_sectors: u32::MAX >> 9,
                max_write_zeroes_sectors: 1 << 14,
                max_discard_segments: 1,
            }),
            dma_align_mask: 0,
        }
    }

    #[test]
    fn encode_fields() {
        let p = volume().encode();
        assert_eq!(p.len, 152);
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
        assert_eq!(p.basic.dev_sectors, 4 << 20);
        assert_eq!(
            (p.basic.logical_bs_shift, p.basic.physical_bs_shift),
            (12, 12)
        );
        assert_eq!((p.basic.io_min_shift, p.basic.io_opt_shift), (12, 20));
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.discard.discard_granularity, 1 << 20);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.devt, sys::ublk_param_devt::default());

        let mut ro = volume();
        ro.read_only = true;
        ro.rotational = true;
        ro.volatile_cache = false;
        ro.fua = false;
        ro.discard = None;
        ro.dma_align_mask = 511;
        let p = ro.encode();
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_READ_ONLY | sys::UBLK_ATTR_ROTATIONAL
        );
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DMA_ALIGN
        );
        assert_eq!(p.dma.alignment, 511);
        assert_eq!(p.discard, sys::ublk_param_discard::default());
    }

    #[test]
    fn round_trip() {
        let mut variants = vec![volume()];
        let mut v = volume();
        v.discard = None;
        v.volatile_cache = false;
        v.fua = false;
        variants.push(v);
        let mut v = volume();
        v.read_only = true;
        v.rotational = true;
        v.dma_align_mask = 4095;
        v.logical_bs_shift = 9;
        v.physical_bs_shift = 12;
        v.io_min_shift = 12;
        v.io_opt_shift = 12;
        v.dev_sectors = 1;
        variants.push(v);
        for p in variants {
            p.validate().expect("valid");
            assert_eq!(Params::decode(&p.encode()), p);
        }
    }

    #[test]
    fn decode_ignores_sections_without_type() {
        let mut k = volume().encode();
        k.types = sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DEVT;
        k.dma.alignment = 511;
        let p = Params::decode(&k);
        assert_eq!(p.discard, None);
        assert_eq!(p.dma_align_mask, 0);
    }

    #[test]
    fn validate_refuses_with_reasons() {
        type Case = (fn(&mut Params), &'static str);
        let cases: Vec<Case> = vec![
            (|p| p.logical_bs_shift = 8, "logical block size"),
            (|p| p.logical_bs_shift = 13, "logical block size"),
            (|p| p.physical_bs_shift = 11, "physical block size"),
            (|p| p.io_min_shift = 9, "io_min"),
            (|p| p.io_opt_shift = 11, "io_opt"),
            (|p| p.io_opt_shift = 31, "io_opt"),
            (|p| p.dev_sectors = 0, "size 0"),
            (|p| p.dev_sectors = 9, "whole number"),
            (|p| p.max_sectors = 7, "max_sectors"),
            (|p| p.volatile_cache = false, "FUA"),
            (
                |p| p.discard.as_mut().expect("set").granularity = 0,
                "granularity",
            ),
            (
                |p| p.discard.as_mut().expect("set").granularity = 512,
                "granularity",
            ),
            (
                |p| p.discard.as_mut().expect("set").max_discard_segments = 2,
                "segment",
            ),
            (
                |p| p.discard.as_mut().expect("set").alignment = 100,
                "alignment",
            ),
            (|p| p.dma_align_mask = 510, "dma_align_mask"),
            (|p| p.dma_align_mask = 4095 + 4096, "dma_align_mask"),
        ];
        for (break_it, needle) in cases {
            let mut p = volume();
            break_it(&mut p);
            let err = p.validate().expect_err(needle);
            assert!(matches!(err, Error::InvalidParams(_)));
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
        // Write-zeroes only: segments do not matter without discard.
        let mut p = volume();
        let d = p.discard.as_mut().expect("set");
        d.max_discard_sectors = 0;
        d.max_discard_segments = 0;
        p.validate().expect("write-zeroes only is fine");
    }
}
