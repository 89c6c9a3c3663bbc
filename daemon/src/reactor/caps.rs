//! Per-thread capabilities: a reactor that serves ublk queues drops `CAP_SYS_ADMIN` from
//! its effective set before its first FETCH, so the ublk driver counts its queues as
//! unprivileged and suppresses partition scans of the device (and refuses `BLKRRPART`):
//! a tenant's partition table is never parsed by the host (DESIGN §5).
//!
//! Capabilities are per thread on Linux; `capset` with pid 0 changes only the calling
//! thread. The capability stays in the permitted set, so the thread could raise it again.
//!
//! Must never: change another thread's capabilities.

/// `_LINUX_CAPABILITY_VERSION_3` (include/uapi/linux/capability.h).
const CAP_VERSION_3: u32 = 0x2008_0522;
/// `CAP_SYS_ADMIN`.
const CAP_SYS_ADMIN: u32 = 21;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn get() -> std::io::Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // capget reads the header and writes two CapData (the layout of version 3).
    // SAFETY: both point to live locals of those layouts; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(data)
}

/// Whether the calling thread has `CAP_SYS_ADMIN` in its effective set.
///
/// # Errors
/// `capget` failed.
pub fn has_sys_admin() -> std::io::Result<bool> {
    Ok(get()?[0].effective & (1 << CAP_SYS_ADMIN) != 0)
}

/// Drops `CAP_SYS_ADMIN` from the calling thread's effective set (kept in the permitted
/// set). A thread without it is left as it is.
///
/// # Errors
/// `capget`/`capset` failed.
pub fn drop_sys_admin_effective() -> std::io::Result<()> {
    let mut data = get()?;
    if data[0].effective & (1 << CAP_SYS_ADMIN) == 0 {
        return Ok(());
    }
    data[0].effective &= !(1 << CAP_SYS_ADMIN);
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads the header and two CapData from live locals; pid 0: this thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_sys_admin_affects_only_this_thread() {
        let before = has_sys_admin().expect("capget");
        let main_before = before;
        let t = std::thread::spawn(|| {
            drop_sys_admin_effective().expect("capset");
            has_sys_admin().expect("capget")
        });
        assert!(!t.join().expect("thread"), "dropped in the thread");
        assert_eq!(
            has_sys_admin().expect("capget"),
            main_before,
            "main thread unchanged"
        );
    }
}
