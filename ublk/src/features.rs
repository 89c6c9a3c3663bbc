//! Feature negotiation: what the running kernel offers (`GET_FEATURES`), and which data
//! path and device flags coreblk asks for in ADD (`choose`).
//!
//! Owns the policy "best path offered, clean fallback, clear refusal". It never talks to
//! the kernel; `Control::features` supplies the word.

use std::fmt;

use crate::sys;
use crate::Error;

/// A ublk feature word (`UBLK_F_*` bits): what a kernel offers, or what a device was
/// created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u64);

/// Names of bits 0..=63, as in the header without the `UBLK_F_` prefix; bits this build
/// does not know are `BITn`.
const NAMES: [&str; 64] = [
    "SUPPORT_ZERO_COPY",
    "URING_CMD_COMP_IN_TASK",
    "NEED_GET_DATA",
    "USER_RECOVERY",
    "USER_RECOVERY_REISSUE",
    "UNPRIVILEGED_DEV",
    "CMD_IOCTL_ENCODE",
    "USER_COPY",
    "ZONED",
    "USER_RECOVERY_FAIL_IO",
    "UPDATE_SIZE",
    "AUTO_BUF_REG",
    "QUIESCE",
    "PER_IO_DAEMON",
    "BUF_REG_OFF_DAEMON",
    "BATCH_IO",
    "INTEGRITY",
    "SAFE_STOP_DEV",
    "NO_AUTO_PART_SCAN",
    "SHMEM_ZC",
    "BIT20",
    "BIT21",
    "BIT22",
    "BIT23",
    "BIT24",
    "BIT25",
    "BIT26",
    "BIT27",
    "BIT28",
    "BIT29",
    "BIT30",
    "BIT31",
    "BIT32",
    "BIT33",
    "BIT34",
    "BIT35",
    "BIT36",
    "BIT37",
    "BIT38",
    "BIT39",
    "BIT40",
    "BIT41",
    "BIT42",
    "BIT43",
    "BIT44",
    "BIT45",
    "BIT46",
    "BIT47",
    "BIT48",
    "BIT49",
    "BIT50",
    "BIT51",
    "BIT52",
    "BIT53",
    "BIT54",
    "BIT55",
    "BIT56",
    "BIT57",
    "BIT58",
    "BIT59",
    "BIT60",
    "BIT61",
    "BIT62",
    "BIT63",
];

impl Features {
    pub const SUPPORT_ZERO_COPY: Self = Self(sys::UBLK_F_SUPPORT_ZERO_COPY);
    pub const URING_CMD_COMP_IN_TASK: Self = Self(sys::UBLK_F_URING_CMD_COMP_IN_TASK);
    pub const NEED_GET_DATA: Self = Self(sys::UBLK_F_NEED_GET_DATA);
    pub const USER_RECOVERY: Self = Self(sys::UBLK_F_USER_RECOVERY);
    pub const USER_RECOVERY_REISSUE: Self = Self(sys::UBLK_F_USER_RECOVERY_REISSUE);
    pub const UNPRIVILEGED_DEV: Self = Self(sys::UBLK_F_UNPRIVILEGED_DEV);
    pub const CMD_IOCTL_ENCODE: Self = Self(sys::UBLK_F_CMD_IOCTL_ENCODE);
    pub const USER_COPY: Self = Self(sys::UBLK_F_USER_COPY);
    pub const ZONED: Self = Self(sys::UBLK_F_ZONED);
    pub const USER_RECOVERY_FAIL_IO: Self = Self(sys::UBLK_F_USER_RECOVERY_FAIL_IO);
    pub const UPDATE_SIZE: Self = Self(sys::UBLK_F_UPDATE_SIZE);
    pub const AUTO_BUF_REG: Self = Self(sys::UBLK_F_AUTO_BUF_REG);
    pub const QUIESCE: Self = Self(sys::UBLK_F_QUIESCE);
    pub const PER_IO_DAEMON: Self = Self(sys::UBLK_F_PER_IO_DAEMON);
    pub const BUF_REG_OFF_DAEMON: Self = Self(sys::UBLK_F_BUF_REG_OFF_DAEMON);
    pub const BATCH_IO: Self = Self(sys::UBLK_F_BATCH_IO);
    pub const INTEGRITY: Self = Self(sys::UBLK_F_INTEGRITY);
    pub const SAFE_STOP_DEV: Self = Self(sys::UBLK_F_SAFE_STOP_DEV);
    pub const NO_AUTO_PART_SCAN: Self = Self(sys::UBLK_F_NO_AUTO_PART_SCAN);
    pub const SHMEM_ZC: Self = Self(sys::UBLK_F_SHMEM_ZC);

    /// Every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the set bits, lowest first.
    pub fn names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .enumerate()
            .filter(|(bit, _)| self.0 & (1u64 << bit) != 0)
            .map(|(_, name)| *name)
            .collect()
    }
}

impl std::ops::BitOr for Features {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// `0x1fe (COMP_IN_TASK|NEED_GET_DATA|...)`; `0x0 (none)`.
impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            write!(f, "{:#x} (none)", self.0)
        } else {
            write!(f, "{:#x} ({})", self.0, names.join("|"))
        }
    }
}

/// How request data moves between the kernel and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// AUTO_BUF_REG: the kernel registers each request's pages in the fixed-buffer table
    /// of the ring that fetched it, at the index given in the command; the backing IO uses
    /// READ_FIXED/WRITE_FIXED. The server never sees the bytes.
    ZeroCopy,
    /// USER_COPY: the server copies with `pread`/`pwrite` on `/dev/ublkcN` at
    /// [`crate::user_copy_offset`].
    UserCopy,
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataPath::ZeroCopy => "zero-copy",
            DataPath::UserCopy => "user-copy",
        })
    }
}

/// The data path asked for in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathPref {
    /// Zero copy where offered, otherwise user copy.
    #[default]
    Auto,
    /// Zero copy or refuse.
    ZeroCopy,
    /// User copy even where zero copy is offered.
    Copy,
}

/// What to ask the kernel for, decided once per kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub path: DataPath,
    /// Device flags for ADD.
    pub flags: u64,
    /// USER_RECOVERY is requested (always: exports survive a daemon restart).
    pub recovery: bool,
    /// USER_RECOVERY_REISSUE is requested (always: held requests go to the next daemon).
    pub reissue: bool,
    /// QUIESCE_DEV is available (graceful upgrade).
    pub quiesce: bool,
    /// UPDATE_SIZE is available (online resize).
    pub update_size: bool,
    /// TRY_STOP_DEV is available (stop only when nobody has the device open).
    pub try_stop: bool,
    /// One line for a log or `node info`.
    pub reason: String,
}

impl Choice {
    /// IO commands use ioctl-encoded opcodes (`UBLK_U_IO_*`).
    pub fn ioctl_encode(&self) -> bool {
        self.flags & sys::UBLK_F_CMD_IOCTL_ENCODE != 0
    }
}

/// Picks the data path and ADD flags for a kernel offering `kernel`.
///
/// Always asks for USER_RECOVERY|USER_RECOVERY_REISSUE (refuses without them), for
/// CMD_IOCTL_ENCODE, QUIESCE and UPDATE_SIZE when offered, and never for
/// UNPRIVILEGED_DEV, NEED_GET_DATA, FAIL_IO (contradicts REISSUE), BATCH_IO (replaces
/// FETCH/COMMIT_AND_FETCH) or NO_AUTO_PART_SCAN (DESIGN §5: partition scans are
/// suppressed by dropping CAP_SYS_ADMIN instead). Zero copy also asks for USER_COPY
/// when offered, so paths that must read the data can `pread` it.
pub fn choose(kernel: Features, pref: PathPref) -> Result<Choice, Error> {
    let recovery = Features::USER_RECOVERY | Features::USER_RECOVERY_REISSUE;
    if !kernel.contains(recovery) {
        return Err(Error::Unsupported {
            what: "user recovery with reissue (USER_RECOVERY|USER_RECOVERY_REISSUE, Linux >= 6.0)",
            kernel_features: kernel,
        });
    }
    let zero_copy = kernel.contains(Features::AUTO_BUF_REG);
    let user_copy = kernel.contains(Features::USER_COPY);
    let (path, why) = match pref {
        PathPref::Auto if zero_copy => (DataPath::ZeroCopy, "offered, preferred"),
        PathPref::Auto if user_copy => {
            (DataPath::UserCopy, "zero copy (AUTO_BUF_REG, Linux >= 6.16) not offered")
        }
        PathPref::Auto => {
            return Err(Error::Unsupported {
                what: "a data path: neither USER_COPY (Linux >= 6.5) nor AUTO_BUF_REG (Linux >= 6.16)",
                kernel_features: kernel,
            })
        }
        PathPref::ZeroCopy if zero_copy => (DataPath::ZeroCopy, "configured"),
        PathPref::ZeroCopy => {
            return Err(Error::Unsupported {
                what: "zero copy as configured (AUTO_BUF_REG, Linux >= 6.16; set the data path to auto or copy)",
                kernel_features: kernel,
            })
        }
        PathPref::Copy if user_copy => (DataPath::UserCopy, "configured"),
        PathPref::Copy => {
            return Err(Error::Unsupported {
                what: "the copy path as configured (USER_COPY, Linux >= 6.5; set the data path to auto)",
                kernel_features: kernel,
            })
        }
    };

    let mut flags = recovery.0;
    let mut path_flags = match path {
        DataPath::ZeroCopy => sys::UBLK_F_AUTO_BUF_REG,
        DataPath::UserCopy => sys::UBLK_F_USER_COPY,
    };
    if path == DataPath::ZeroCopy && user_copy {
        path_flags |= sys::UBLK_F_USER_COPY;
    }
    flags |= path_flags;
    for optional in [
        Features::CMD_IOCTL_ENCODE,
        Features::QUIESCE,
        Features::UPDATE_SIZE,
    ] {
        if kernel.contains(optional) {
            flags |= optional.0;
        }
    }
    debug_assert!(
        flags & kernel.0 == flags,
        "asked for a flag the kernel does not offer"
    );
    debug_assert!(flags & sys::UBLK_F_UNPRIVILEGED_DEV == 0);

    let quiesce = kernel.contains(Features::QUIESCE);
    let update_size = kernel.contains(Features::UPDATE_SIZE);
    let try_stop = kernel.contains(Features::SAFE_STOP_DEV);
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let reason = format!(
        "ublk data path {path} ({}; {why}); recovery with reissue; quiesce {}, update-size {}, try-stop {}; kernel offers {kernel}",
        Features(path_flags).names().join("+"),
        yes_no(quiesce),
        yes_no(update_size),
        yes_no(try_stop),
    );
    Ok(Choice {
        path,
        flags,
        recovery: true,
        reissue: true,
        quiesce,
        update_size,
        try_stop,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian bookworm-backports 6.12, measured in our VM.
    const LTS: Features = Features(0x1fe);
    /// trixie-backports 7.3: every bit up to 1 << 20.
    const LATEST: Features = Features((1 << 21) - 1);

    #[test]
    fn names_and_display() {
        assert_eq!(
            LTS.names(),
            [
                "URING_CMD_COMP_IN_TASK",
                "NEED_GET_DATA",
                "USER_RECOVERY",
                "USER_RECOVERY_REISSUE",
                "UNPRIVILEGED_DEV",
                "CMD_IOCTL_ENCODE",
                "USER_COPY",
                "ZONED"
            ]
        );
        assert_eq!(Features(0).to_string(), "0x0 (none)");
        assert_eq!(
            Features(sys::UBLK_F_AUTO_BUF_REG | 1 << 63).to_string(),
            "0x8000000000000800 (AUTO_BUF_REG|BIT63)"
        );
        assert_eq!(LATEST.names().len(), 21);
        assert_eq!(LATEST.names()[20], "BIT20");
        assert!(LATEST.contains(Features::AUTO_BUF_REG | Features::USER_COPY));
        assert!(!LTS.contains(Features::AUTO_BUF_REG | Features::USER_COPY));
        for (bit, name) in NAMES.iter().enumerate() {
            assert!(bit < 20 || *name == format!("BIT{bit}"));
        }
    }

    #[test]
    fn lts_gets_user_copy() {
        let c = choose(LTS, PathPref::Auto).expect("6.12 is supported");
        assert_eq!(c.path, DataPath::UserCopy);
        assert_eq!(
            c.flags,
            sys::UBLK_F_USER_RECOVERY
                | sys::UBLK_F_USER_RECOVERY_REISSUE
                | sys::UBLK_F_USER_COPY
                | sys::UBLK_F_CMD_IOCTL_ENCODE
        );
        assert!(c.recovery && c.reissue && c.ioctl_encode());
        assert!(!c.quiesce && !c.update_size && !c.try_stop);
        assert!(c.reason.contains("user-copy"), "{}", c.reason);
        assert!(c.reason.contains("AUTO_BUF_REG"), "{}", c.reason);
        assert_eq!(
            choose(LTS, PathPref::Copy).expect("copy offered").path,
            DataPath::UserCopy
        );
        let err = choose(LTS, PathPref::ZeroCopy).expect_err("6.12 has no AUTO_BUF_REG");
        assert!(
            matches!(err, Error::Unsupported { kernel_features, .. } if kernel_features == LTS)
        );
        assert!(err.to_string().contains("AUTO_BUF_REG"), "{err}");
    }

    #[test]
    fn latest_gets_zero_copy() {
        let c = choose(LATEST, PathPref::Auto).expect("7.x is supported");
        assert_eq!(c.path, DataPath::ZeroCopy);
        assert_eq!(
            c.flags,
            sys::UBLK_F_USER_RECOVERY
                | sys::UBLK_F_USER_RECOVERY_REISSUE
                | sys::UBLK_F_AUTO_BUF_REG
                | sys::UBLK_F_USER_COPY
                | sys::UBLK_F_CMD_IOCTL_ENCODE
                | sys::UBLK_F_QUIESCE
                | sys::UBLK_F_UPDATE_SIZE
        );
        assert!(c.quiesce && c.update_size && c.try_stop);
        let forced = choose(LATEST, PathPref::ZeroCopy).expect("offered");
        assert_eq!((forced.path, forced.flags), (c.path, c.flags));
        assert!(forced.reason.contains("configured"), "{}", forced.reason);
        let copy = choose(LATEST, PathPref::Copy).expect("offered");
        assert_eq!(copy.path, DataPath::UserCopy);
        assert_eq!(copy.flags & sys::UBLK_F_AUTO_BUF_REG, 0);
        assert_ne!(copy.flags & sys::UBLK_F_USER_COPY, 0);
    }

    #[test]
    fn never_asks_for_dangerous_or_protocol_changing_flags() {
        for kernel in [LTS, LATEST, Features(u64::MAX)] {
            for pref in [PathPref::Auto, PathPref::ZeroCopy, PathPref::Copy] {
                let Ok(c) = choose(kernel, pref) else {
                    assert!(kernel == LTS && pref == PathPref::ZeroCopy);
                    continue;
                };
                for bad in [
                    Features::UNPRIVILEGED_DEV,
                    Features::NEED_GET_DATA,
                    Features::USER_RECOVERY_FAIL_IO,
                    Features::BATCH_IO,
                    Features::NO_AUTO_PART_SCAN,
                    Features::ZONED,
                    Features::SUPPORT_ZERO_COPY,
                    Features::SHMEM_ZC,
                    Features::INTEGRITY,
                ] {
                    assert!(
                        !Features(c.flags).contains(bad),
                        "{kernel} {pref:?} asked for {bad}"
                    );
                }
                assert_eq!(c.flags & !kernel.0, 0);
            }
        }
    }

    #[test]
    fn odd_kernels() {
        // Zero copy without USER_COPY: zero copy alone, no USER_COPY asked for.
        let k = Features(
            sys::UBLK_F_USER_RECOVERY
                | sys::UBLK_F_USER_RECOVERY_REISSUE
                | sys::UBLK_F_AUTO_BUF_REG,
        );
        let c = choose(k, PathPref::Auto).expect("zero copy offered");
        assert_eq!(c.path, DataPath::ZeroCopy);
        assert_eq!(c.flags, k.0);
        assert!(!c.ioctl_encode());
        assert!(matches!(
            choose(k, PathPref::Copy),
            Err(Error::Unsupported { .. })
        ));

        // Neither data path.
        let k = Features(
            sys::UBLK_F_USER_RECOVERY
                | sys::UBLK_F_USER_RECOVERY_REISSUE
                | sys::UBLK_F_CMD_IOCTL_ENCODE,
        );
        let err = choose(k, PathPref::Auto).expect_err("no data path");
        assert!(err.to_string().contains("neither USER_COPY"), "{err}");

        // No reissue: refused whatever the path.
        let k = Features(0x1fe & !sys::UBLK_F_USER_RECOVERY_REISSUE);
        let err = choose(k, PathPref::Auto).expect_err("no reissue");
        assert!(err.to_string().contains("USER_RECOVERY_REISSUE"), "{err}");
        assert!(err.to_string().contains("0x1ee"), "{err}");

        // Nothing at all (GET_FEATURES absent).
        assert!(choose(Features(0), PathPref::Auto).is_err());
    }
}
