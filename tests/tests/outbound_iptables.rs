//! Outbound capture by iptables (the comparison baseline), on the real kernel (run as root).
mod common;

use std::net::SocketAddr;

use common::*;

fn intercepted(mesh: &MeshLab, target: SocketAddr) {
    let before = mesh.proxy_metric("istio_tcp_connections_opened_total");
    let report = mesh.connect(target);
    assert!(report.echo_ok);
    assert_eq!(
        report.peer, target,
        "getpeername shows the real peer under NAT"
    );
    assert_eq!(
        canonical(report.server.local),
        canonical(target),
        "proxy dialled the wrong destination"
    );
    assert_eq!(
        mesh.proxy_metric("istio_tcp_connections_opened_total"),
        before + 1,
        "{target} not proxied"
    );
    let orig = canonical(target).to_string();
    let log = mesh.proxy_log();
    assert!(
        log.lines()
            .any(|l| l.contains("orig_dst") && l.contains(&orig)),
        "no orig_dst {orig} in:\n{log}"
    );
}

fn direct(mesh: &MeshLab, target: SocketAddr, user: Option<u32>) {
    let before = mesh.proxy_metric("istio_tcp_connections_opened_total");
    let report = mesh.connect_as(target, user).expect("direct connect");
    assert!(report.echo_ok);
    assert_eq!(canonical(report.server.local), canonical(target));
    assert_eq!(
        mesh.proxy_metric("istio_tcp_connections_opened_total"),
        before,
        "{target} was proxied"
    );
}

#[test]
fn intercepts_ipv4_ipv6_and_mapped() {
    let mut mesh = MeshLab::new("ipt-basic", Layout::Iptables);
    mesh.init(&[]);
    mesh.start_proxy();
    for target in [
        mesh.server_v4(ECHO_PORT),
        mesh.server_v6(ECHO_PORT),
        mesh.server_mapped(ECHO_PORT),
    ] {
        intercepted(&mesh, target);
    }
    assert_eq!(mesh.proxy_metric("sidecar_outbound_failures_total"), 0);
}

#[test]
fn excluded_port_cidr_and_proxy_uid_go_direct() {
    let mut mesh = MeshLab::new("ipt-excl", Layout::Iptables);
    let excluded_cidr = format!("{}/128", mesh.server.ipv6());
    mesh.init(&[
        "--exclude-ports",
        "9000-9100",
        "--exclude-cidrs",
        &excluded_cidr,
    ]);
    mesh.start_proxy();
    direct(&mesh, mesh.server_v4(OTHER_PORT), None);
    direct(&mesh, mesh.server_v6(ECHO_PORT), None);
    direct(&mesh, mesh.server_v4(ECHO_PORT), Some(PROXY_ID));
    intercepted(&mesh, mesh.server_v4(ECHO_PORT));
}

#[test]
fn init_twice_replaces_and_cleanup_removes_every_rule() {
    let mut mesh = MeshLab::new("ipt-idem", Layout::Iptables);
    mesh.init(&["--exclude-ports", "22"]);
    mesh.init(&["--exclude-ports", "2222"]);
    for cmd in ["iptables", "ip6tables"] {
        let rules = mesh.nat_rules(cmd);
        assert_eq!(
            rules.matches("-A OUTPUT -p tcp -j SIDECAR_OUTPUT").count(),
            1,
            "{cmd}:\n{rules}"
        );
        assert_eq!(
            rules.matches("-j SIDECAR_REDIRECT").count(),
            1,
            "{cmd}:\n{rules}"
        );
        assert!(
            rules.contains("--dports 2222") && !rules.contains("--dports 22 "),
            "{cmd}:\n{rules}"
        );
    }
    mesh.start_proxy();
    intercepted(&mesh, mesh.server_v4(ECHO_PORT));

    let out = mesh
        .client
        .command(sidecar_bin())
        .args(["cleanup", "--iptables"])
        .run()
        .expect("cleanup");
    assert!(out.status.success(), "{}", text(&out));
    for cmd in ["iptables", "ip6tables"] {
        let rules = mesh.nat_rules(cmd);
        assert!(
            !rules.contains("SIDECAR"),
            "{cmd} rules left after cleanup:\n{rules}"
        );
    }
    direct(&mesh, mesh.server_v4(ECHO_PORT), None);
}
