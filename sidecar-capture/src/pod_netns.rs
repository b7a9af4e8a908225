//! What `init` sets inside the pod's network namespace besides capture itself, as Istio's init
//! does: the proxy's IPv6 passthrough source (`::6` on `lo`), and the proxy's ports reserved
//! from the kernel's automatic port choice (`ip_local_reserved_ports`), so a listen() without
//! bind never lands on them, the one way around the kernel's bind guard.
//!
//! Done from a short-lived thread that enters the namespace: namespaces are per thread, so
//! init itself never leaves its own.
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd,
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use sidecar_common::PASSTHROUGH_SOURCE_V6;

/// `lo` is the first device of every network namespace (`LOOPBACK_IFINDEX` in the kernel).
const LOOPBACK_IFINDEX: u32 = 1;
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const LO_IPV6_DISABLED: &str = "/proc/sys/net/ipv6/conf/lo/disable_ipv6";

/// Prepares the namespace `netns` (the current one when `None`) for a proxy serving
/// `proxy_ports`. Idempotent: a second init finds everything in place.
pub fn prepare(netns: Option<&File>, proxy_ports: &[u16]) -> Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(netns) = netns {
                    move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))
                        .context("cannot enter the pod's network namespace")?;
                }
                add_passthrough_source()?;
                reserve_ports(proxy_ports)
            })
            .join()
            .map_err(|_| anyhow!("the network namespace setup thread panicked"))?
    })
}

/// Adds `::6/128` to `lo` (no duplicate address detection, like Istio's `ip -6 addr add ::6/128
/// dev lo nodad`), the source the proxy hands inbound IPv6 connections to the app from.
fn add_passthrough_source() -> Result<()> {
    // With IPv6 off in the pod, there is no IPv6 inbound traffic to pass through.
    let ipv6_disabled = std::fs::read_to_string(LO_IPV6_DISABLED)
        .map(|value| value.trim() == "1")
        .unwrap_or(true);
    if ipv6_disabled {
        return Ok(());
    }
    let address = Ipv6Addr::from(PASSTHROUGH_SOURCE_V6);
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet6;
    message.header.prefix_len = 128;
    message.header.scope = AddressScope::Host;
    message.header.index = LOOPBACK_IFINDEX;
    message.header.flags = AddressHeaderFlags::Nodad;
    message.attributes = vec![AddressAttribute::Local(IpAddr::V6(address))];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::NewAddress(message)),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);

    let context = || format!("cannot add {address}/128 to lo in the pod's network namespace");
    let mut socket = Socket::new(NETLINK_ROUTE).with_context(context)?;
    socket.bind_auto().with_context(context)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .with_context(context)?;
    socket.send(&buffer, 0).with_context(context)?;
    let mut reply = Vec::with_capacity(4096);
    socket.recv(&mut reply, 0).with_context(context)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| anyhow!("{e}"))
        .with_context(context)?;
    match reply.payload {
        NetlinkPayload::Error(error) => match error.code {
            None => Ok(()),
            Some(code) if -code.get() == libc::EEXIST => Ok(()), // a previous init added it
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())).with_context(context),
        },
        other => bail!("{}: unexpected netlink answer {other:?}", context()),
    }
}

/// Adds `ports` to the namespace's reserved ports, keeping those already reserved. The IPv4
/// sysctl covers IPv6 sockets too.
fn reserve_ports(ports: &[u16]) -> Result<()> {
    let path = Path::new(RESERVED_PORTS);
    let current =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ours = ports.iter().map(u16::to_string);
    let list: Vec<String> = current
        .trim()
        .split(',')
        .filter(|entry| !entry.is_empty())
        .map(str::to_string)
        .chain(ours)
        .collect();
    std::fs::write(path, list.join(","))
        .with_context(|| format!("cannot reserve ports {ports:?} in {}", path.display()))
}
