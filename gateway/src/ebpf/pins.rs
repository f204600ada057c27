//! The pin directory: what lives there, and the raw `bpf(2)` calls aya 0.14 does not offer
//! for pinned links (which cgroup a link is attached to, and forced detach).
//!
//! ```text
//! <pin_dir>/dbgw_config, dbgw_ports, …   maps, pinned by name by the loader (maps.h)
//! <pin_dir>/prog_<program>                the loaded programs
//! <pin_dir>/link_<program>                the cgroup links: while a link pin exists, the
//!                                         program stays attached, agent running or not
//! ```

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

/// uapi `enum bpf_cmd` and `enum bpf_link_type` values (checked against linux/bpf.h by the
/// layout test in `maps.rs`).
pub(crate) const BPF_OBJ_GET: u32 = 7;
pub(crate) const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
pub(crate) const BPF_LINK_DETACH: u32 = 34;
pub(crate) const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// uapi `enum bpf_attach_type` values of our hooks.
pub(crate) const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub(crate) const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub(crate) const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub(crate) const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
pub(crate) const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
pub(crate) const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;

/// Offsets in uapi `struct bpf_link_info` (also checked by the layout test).
pub(crate) const LINK_INFO_TYPE: usize = 0;
pub(crate) const LINK_INFO_CGROUP_ID: usize = 16;
pub(crate) const LINK_INFO_CGROUP_ATTACH_TYPE: usize = 24;

/// Where program `name` is pinned.
pub fn program_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("prog_{name}"))
}

/// Where the cgroup link of program `name` is pinned.
pub fn link_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("link_{name}"))
}

/// A pinned cgroup link as the kernel describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLink {
    /// The cgroup it is attached to; 0 once that cgroup was removed (the link is then dead).
    pub cgroup_id: u64,
    /// uapi `enum bpf_attach_type`.
    pub attach_type: u32,
}

fn bpf(cmd: u32, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed 128-byte union bpf_attr large enough for every command used
    // here; the kernel reads and writes only within the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_long,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned object (`BPF_OBJ_GET`). `Ok(None)` if nothing is pinned there.
fn obj_get(path: &Path) -> io::Result<Option<OwnedFd>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    // attr.pathname (u64 at offset 0); bpf_fd and file_flags stay 0 (read-write).
    attr[0] = c.as_ptr() as u64;
    match bpf(BPF_OBJ_GET, &mut attr) {
        // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the link pinned at `path` is attached to; `Ok(None)` if no link is pinned there or the
/// object pinned there is not a cgroup link.
pub fn cgroup_link(path: &Path) -> io::Result<Option<CgroupLink>> {
    let Some(fd) = obj_get(path)? else {
        return Ok(None);
    };
    // struct bpf_link_info is 48 bytes in 6.1 headers and may grow; the kernel copies at most
    // the size we pass, and 128 zeroed bytes pass its "unknown tail is zero" check.
    let mut info = [0u8; 128];
    let mut attr = [0u64; 16];
    // attr.info: bpf_fd (u32 at 0), info_len (u32 at 4), info (u64 at 8).
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().expect("8 bytes"));
    if u32_at(LINK_INFO_TYPE) != BPF_LINK_TYPE_CGROUP {
        return Ok(None);
    }
    Ok(Some(CgroupLink {
        cgroup_id: u64_at(LINK_INFO_CGROUP_ID),
        attach_type: u32_at(LINK_INFO_CGROUP_ATTACH_TYPE),
    }))
}

/// Detaches the link pinned at `path` now (`BPF_LINK_DETACH`, Linux 5.9+) and removes the pin.
/// Removing the pin alone would detach it too, but only once the last reference is dropped,
/// which the kernel defers to a workqueue: a caller that checks right after would race it.
pub fn detach_and_unpin_link(path: &Path) -> io::Result<()> {
    if let Some(fd) = obj_get(path)? {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(fd.as_raw_fd() as u32); // attr.link_detach.link_fd
        match bpf(BPF_LINK_DETACH, &mut attr) {
            // ENOLINK: already detached (its cgroup is gone).
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            // EINVAL/EOPNOTSUPP: not a link, or a kernel without LINK_DETACH; unpinning below
            // still detaches it, a moment later.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes a pinned program or map (the kernel frees it once nothing else holds it).
pub fn unpin(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_constants_match_linux_bpf_h() {
        let c: std::collections::HashMap<&str, usize> =
            include_str!(concat!(env!("OUT_DIR"), "/maps_layout.txt"))
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(k, v)| (k, v.parse().expect("number")))
                .collect();
        let u = |v: u32| v as usize;
        assert_eq!(c["BPF_OBJ_GET"], u(BPF_OBJ_GET));
        assert_eq!(c["BPF_OBJ_GET_INFO_BY_FD"], u(BPF_OBJ_GET_INFO_BY_FD));
        assert_eq!(c["BPF_LINK_DETACH"], u(BPF_LINK_DETACH));
        assert_eq!(c["BPF_LINK_TYPE_CGROUP"], u(BPF_LINK_TYPE_CGROUP));
        assert_eq!(c["BPF_CGROUP_SOCK_OPS"], u(BPF_CGROUP_SOCK_OPS));
        assert_eq!(c["BPF_CGROUP_INET4_CONNECT"], u(BPF_CGROUP_INET4_CONNECT));
        assert_eq!(c["BPF_CGROUP_INET6_CONNECT"], u(BPF_CGROUP_INET6_CONNECT));
        assert_eq!(
            c["BPF_CGROUP_INET4_GETPEERNAME"],
            u(BPF_CGROUP_INET4_GETPEERNAME)
        );
        assert_eq!(
            c["BPF_CGROUP_INET6_GETPEERNAME"],
            u(BPF_CGROUP_INET6_GETPEERNAME)
        );
        assert_eq!(
            c["BPF_CGROUP_INET_SOCK_RELEASE"],
            u(BPF_CGROUP_INET_SOCK_RELEASE)
        );
        assert_eq!(c["bpf_link_info.type"], LINK_INFO_TYPE);
        assert_eq!(c["bpf_link_info.cgroup.cgroup_id"], LINK_INFO_CGROUP_ID);
        assert_eq!(
            c["bpf_link_info.cgroup.attach_type"],
            LINK_INFO_CGROUP_ATTACH_TYPE
        );
        assert!(
            c["bpf_link_info"] <= 128,
            "cgroup_link's buffer is too small"
        );
    }
}
