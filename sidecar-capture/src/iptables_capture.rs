//! iptables capture, the comparison baseline: the equivalent of istio-init's rules in the
//! current network namespace (nat OUTPUT for outbound, nat PREROUTING for inbound), with the
//! same exemptions as the eBPF capture.
use std::process::Command;

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

use crate::capture_settings::CaptureSettings;

pub const OUTPUT_CHAIN: &str = "SIDECAR_OUTPUT";
pub const REDIRECT_CHAIN: &str = "SIDECAR_REDIRECT";
pub const INBOUND_CHAIN: &str = "SIDECAR_INBOUND";
pub const IN_REDIRECT_CHAIN: &str = "SIDECAR_IN_REDIRECT";
const CHAINS: [&str; 4] = [
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
];

/// The built-in chain and the rule that sends TCP into one of ours.
struct Jump {
    from: &'static str,
    to: &'static str,
}

const OUTBOUND_JUMP: Jump = Jump {
    from: "OUTPUT",
    to: OUTPUT_CHAIN,
};
const INBOUND_JUMP: Jump = Jump {
    from: "PREROUTING",
    to: INBOUND_CHAIN,
};

impl Jump {
    fn args(&self, op: &'static str) -> Vec<&'static str> {
        vec!["-w", "-t", "nat", op, self.from, "-p", "tcp", "-j", self.to]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// The source the proxy uses to hand inbound connections to the app (Istio's 127.0.0.6
    /// and ::6, see `sidecar_common::PASSTHROUGH_SOURCE_V4`).
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
}

/// The `iptables-restore --noflush` input for one family. Declaring our chains flushes them,
/// so applying twice replaces the rules rather than duplicating them.
pub fn restore_script(settings: &CaptureSettings, family: Family) -> String {
    let mut lines = vec!["*nat".to_string()];
    lines.extend(CHAINS.iter().map(|chain| format!(":{chain} - [0:0]")));
    lines.push(format!(
        "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        settings.outbound_port
    ));
    // The proxy's inbound passthrough to the app must not be captured as outbound.
    lines.push(format!(
        "-A {OUTPUT_CHAIN} -o lo -s {} -j RETURN",
        family.passthrough_source()
    ));
    if let Some(uid) = settings.proxy_uid {
        lines.push(format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {uid} -j RETURN"
        ));
    }
    if let Some(gid) = settings.proxy_gid {
        lines.push(format!(
            "-A {OUTPUT_CHAIN} -m owner --gid-owner {gid} -j RETURN"
        ));
    }
    lines.push(format!(
        "-A {OUTPUT_CHAIN} -d {} -j RETURN",
        family.loopback()
    ));
    for ports in settings.excluded_ports.multiport_lists() {
        lines.push(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN"
        ));
    }
    for cidr in &settings.excluded_cidrs {
        let matches = matches!(
            (cidr, family),
            (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
        );
        if matches {
            lines.push(format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN"));
        }
    }
    lines.push(format!("-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}"));
    if let Some(inbound_port) = settings.inbound_port {
        lines.push(format!(
            "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {inbound_port}"
        ));
        for ports in settings.inbound_exclusions().multiport_lists() {
            lines.push(format!(
                "-A {INBOUND_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN"
            ));
        }
        lines.push(format!("-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}"));
    }
    lines.push("COMMIT".to_string());
    lines.join("\n") + "\n"
}

/// Installs (or replaces) the rules for both families.
pub fn install(settings: &CaptureSettings) -> Result<()> {
    if settings.proxy_uid.is_none() && settings.proxy_gid.is_none() {
        bail!(
            "iptables mode needs --proxy-uid or --proxy-gid: iptables can only exempt the proxy \
             by its owner, and without it the proxy's own upstream connections would loop"
        );
    }
    for family in Family::BOTH {
        let restore = format!("{}-restore", family.iptables());
        run_with_input(
            &restore,
            &["-w", "--noflush"],
            &restore_script(settings, family),
        )?;
        let cmd = family.iptables();
        ensure_jump(cmd, &OUTBOUND_JUMP)?;
        if settings.inbound_port.is_some() {
            ensure_jump(cmd, &INBOUND_JUMP)?;
        } else {
            remove_jump(cmd, &INBOUND_JUMP)?;
        }
    }
    Ok(())
}

fn ensure_jump(cmd: &str, jump: &Jump) -> Result<()> {
    if !succeeds(cmd, &jump.args("-C")) {
        run(cmd, &jump.args("-A"))?;
    }
    Ok(())
}

/// Deletes every copy of `jump`; true if there was one.
fn remove_jump(cmd: &str, jump: &Jump) -> Result<bool> {
    let mut removed = false;
    while succeeds(cmd, &jump.args("-C")) {
        run(cmd, &jump.args("-D"))?;
        removed = true;
    }
    Ok(removed)
}

/// Removes our jumps and chains for both families; returns a line per thing removed.
pub fn remove() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for family in Family::BOTH {
        let cmd = family.iptables();
        for jump in [&OUTBOUND_JUMP, &INBOUND_JUMP] {
            if remove_jump(cmd, jump)? {
                removed.push(format!("{cmd}: {} jump to {}", jump.from, jump.to));
            }
        }
        for chain in CHAINS {
            if succeeds(cmd, &["-w", "-t", "nat", "-S", chain]) {
                run(cmd, &["-w", "-t", "nat", "-F", chain])?;
                run(cmd, &["-w", "-t", "nat", "-X", chain])?;
                removed.push(format!("{cmd}: chain {chain}"));
            }
        }
    }
    Ok(removed)
}

/// Our rules with their packet counters, per family, if installed in this netns.
pub fn describe() -> Vec<(Family, String)> {
    Family::BOTH
        .iter()
        .filter_map(|&family| {
            let mut listing = String::new();
            for chain in [OUTPUT_CHAIN, INBOUND_CHAIN] {
                let output = Command::new(family.iptables())
                    .args(["-w", "-t", "nat", "-L", chain, "-n", "-v", "-x"])
                    .output()
                    .ok()?;
                if !output.status.success() {
                    return None;
                }
                listing.push_str(&String::from_utf8_lossy(&output.stdout));
            }
            Some((family, listing))
        })
        .collect()
}

fn succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd} (is the iptables package installed?)"))?;
    if !output.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn run_with_input(cmd: &str, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd} (is the iptables package installed?)"))?;
    child
        .stdin
        .take()
        .context("no stdin for iptables-restore")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{cmd} failed: {}\nrules were:\n{input}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CaptureSettings {
        CaptureSettings {
            outbound_port: 15001,
            proxy_uid: Some(1337),
            proxy_gid: Some(1337),
            excluded_ports: "22,8000-8100".parse().unwrap(),
            excluded_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            inbound_port: Some(15006),
            excluded_inbound_ports: "22".parse().unwrap(),
            when_proxy_down: crate::capture_settings::WhenProxyDown::Refuse,
        }
    }

    #[test]
    fn v4_rules_match_istio_init_shape() {
        let script = restore_script(&settings(), Family::V4);
        let expected = "\
*nat
:SIDECAR_OUTPUT - [0:0]
:SIDECAR_REDIRECT - [0:0]
:SIDECAR_INBOUND - [0:0]
:SIDECAR_IN_REDIRECT - [0:0]
-A SIDECAR_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A SIDECAR_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A SIDECAR_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A SIDECAR_OUTPUT -d 127.0.0.0/8 -j RETURN
-A SIDECAR_OUTPUT -p tcp -m multiport --dports 22,8000:8100 -j RETURN
-A SIDECAR_OUTPUT -d 10.0.0.0/8 -j RETURN
-A SIDECAR_OUTPUT -j SIDECAR_REDIRECT
-A SIDECAR_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A SIDECAR_INBOUND -p tcp -m multiport --dports 22,15001,15006,15020:15021 -j RETURN
-A SIDECAR_INBOUND -p tcp -j SIDECAR_IN_REDIRECT
COMMIT
";
        assert_eq!(script, expected);
    }

    #[test]
    fn no_inbound_rules_when_inbound_capture_is_off() {
        let mut s = settings();
        s.inbound_port = None;
        let script = restore_script(&s, Family::V4);
        assert!(!script.contains("-A SIDECAR_INBOUND"), "{script}");
        assert!(
            script.contains(":SIDECAR_INBOUND - [0:0]"),
            "chains are always declared (flushed)"
        );
    }

    #[test]
    fn v6_rules_keep_only_v6_cidrs() {
        let script = restore_script(&settings(), Family::V6);
        assert!(script.contains("-d ::1/128 -j RETURN"));
        assert!(script.contains("-d fd00::/8 -j RETURN"));
        assert!(!script.contains("10.0.0.0/8"));
    }

    #[test]
    fn refuses_without_an_owner_exemption() {
        let mut s = settings();
        s.proxy_uid = None;
        s.proxy_gid = None;
        let err = install(&s).unwrap_err().to_string();
        assert!(err.contains("--proxy-uid"), "{err}");
    }
}
