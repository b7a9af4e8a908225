//! Who is calling the admin endpoints: the UID owning the caller's TCP socket. The admin
//! listener is on loopback, so the caller's socket is in the proxy's network namespace and in
//! its TCP table (`/proc/net/tcp`, `tcp6`, which reflect the reader's namespace), with its
//! owner in the `uid` column (SO_PEERCRED answers for Unix sockets only).
//!
//! Only an open socket counts: once the caller closes it, the kernel lists a lingering
//! (orphaned or TIME_WAIT) socket with inode 0, and a TIME_WAIT one with UID 0, which must not
//! pass for root.
use std::net::SocketAddr;

use rustix::process::geteuid;

/// Who may change or stop the proxy: root, the proxy's own user, and the UIDs the operator
/// allowed.
pub fn may_change_the_proxy(uid: u32, allowed: &[u32]) -> bool {
    uid == 0 || uid == geteuid().as_raw() || allowed.contains(&uid)
}

/// The UID owning the socket connected to `local` from `peer`, as seen by the proxy (`local`:
/// the admin listener's address of the connection, `peer`: the caller's).
pub fn uid_of(local: SocketAddr, peer: SocketAddr) -> Result<u32, String> {
    let (local, peer) = (canonical(local), canonical(peer));
    let mut entries = procfs::net::tcp().map_err(|e| format!("cannot read /proc/net/tcp: {e}"))?;
    // No IPv6 in the kernel: no table, and no IPv6 caller either.
    entries.extend(procfs::net::tcp6().unwrap_or_default());
    // The caller's socket is the one whose local end is our peer and whose remote end is us.
    entries
        .iter()
        .find(|entry| {
            canonical(entry.local_address) == peer
                && canonical(entry.remote_address) == local
                && entry.inode != 0
        })
        .map(|entry| entry.uid)
        .ok_or_else(|| format!("no open socket from {peer} to {local} in this network namespace"))
}

/// IPv4-mapped IPv6 as IPv4: a v4 caller of a dual-stack listener is in the v4 table.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn the_callers_socket_is_found_with_its_owner() -> anyhow::Result<()> {
        for ip in ["127.0.0.1", "[::1]"] {
            let listener = match TcpListener::bind(format!("{ip}:0")) {
                Ok(listener) => listener,
                Err(_) if ip.starts_with('[') => continue, // no IPv6 on this host
                Err(error) => return Err(error.into()),
            };
            let caller = TcpStream::connect(listener.local_addr()?)?;
            let (accepted, peer) = listener.accept()?;
            let uid = uid_of(accepted.local_addr()?, peer).map_err(anyhow::Error::msg)?;
            assert_eq!(uid, geteuid().as_raw());
            assert!(may_change_the_proxy(uid, &[]));

            // Closed: its lingering socket does not stand for anyone.
            drop(caller);
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(uid_of(accepted.local_addr()?, peer).is_err());
        }
        Ok(())
    }

    #[test]
    fn other_users_may_not_change_the_proxy() {
        let other = if geteuid().as_raw() == 1000 {
            1001
        } else {
            1000
        };
        assert!(!may_change_the_proxy(other, &[]));
        assert!(may_change_the_proxy(other, &[other]));
        assert!(may_change_the_proxy(0, &[]));
    }
}
