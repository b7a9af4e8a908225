//! The raw `bpf()` calls aya 0.14 does not offer, the raw `getsockopt` of the capture's status
//! option (no crate wraps an option of our own), and the only `unsafe` in userspace.
//!
//! aya cannot turn a cgroup_sockopt attachment into a pinnable link, and it has no query of
//! what a cgroup has attached. Rather than mixing two attach paths, every cgroup program is
//! attached here with `BPF_LINK_CREATE`, pinned with `BPF_OBJ_PIN`, and listed with
//! `BPF_PROG_QUERY`. The sockmap shortcut's sk_msg program is attached to its map with
//! `BPF_PROG_ATTACH`: aya would detach it when the loader exits.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `bpf_attr` for `BPF_LINK_CREATE` (the fields we use; the rest must be zero).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    reserved: [u64; 4],
}

/// `bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    reserved: [u32; 11],
}

/// `bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    reserved: u32,
}

/// `bpf_attr` for `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    reserved: [u32; 9],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly sized, zero-padded bpf_attr for `cmd`, valid for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches a loaded program to a cgroup as a bpf_link (multi-attach, detached when the last
/// reference to the link goes away: the returned fd, or a pin).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success BPF_LINK_CREATE returns a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a loaded program to a sockmap or sockhash (`target`). The attachment lives as
/// long as the map (a pinned map outlives the loader), and a later attach replaces it.
pub fn prog_attach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// Pins a BPF object (here: a link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path contains NUL"))?;
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// IDs of the programs attached to `cgroup` (itself, not inherited) for `attach_type`.
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// `getsockopt(fd, level, optname)` into `buf`; the length the kernel (or the capture's
/// getsockopt program) wrote.
pub fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: i32,
    optname: i32,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes, and the kernel writes at most `len` and updates it.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            optname,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len as usize)
    }
}
