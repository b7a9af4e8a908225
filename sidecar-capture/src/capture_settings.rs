//! What `sidecar init` is asked to capture, parsed and validated before anything is touched.
use std::{fmt, ops::RangeInclusive, str::FromStr};

use ipnet::IpNet;
use serde::Serialize;
use sidecar_common::{MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORT_PREFIXES, PROXY_PORTS};

/// Settings shared by both capture modes, so eBPF and iptables capture exactly the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CaptureSettings {
    pub outbound_port: u16,
    pub proxy_uid: Option<u32>,
    pub proxy_gid: Option<u32>,
    pub excluded_ports: PortRanges,
    pub excluded_cidrs: Vec<IpNet>,
    /// None: inbound capture off.
    pub inbound_port: Option<u16>,
    /// Local ports whose inbound connections go straight to the app.
    pub excluded_inbound_ports: PortRanges,
    pub when_proxy_down: WhenProxyDown,
}

/// `init --when-proxy-down`, shared with `status`'s report.
pub use sidecar_common::WhenProxyDown;

impl CaptureSettings {
    /// The ports capture sends traffic to, which only the proxy may bind.
    pub fn proxy_ports(&self) -> Vec<u16> {
        [Some(self.outbound_port), self.inbound_port]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The inbound ports never captured: the user's, the proxy's own ports (Istio's
    /// numbering) and this configuration's outbound and inbound ports.
    pub fn inbound_exclusions(&self) -> PortRanges {
        let mut ranges = self.excluded_inbound_ports.0.clone();
        let own = PROXY_PORTS
            .iter()
            .copied()
            .chain([self.outbound_port])
            .chain(self.inbound_port);
        ranges.extend(own.map(|port| port..=port));
        PortRanges(ranges).normalized()
    }

    /// Checks the settings fit the eBPF capture's tries, before anything is touched: port sets
    /// as 16-bit prefixes, CIDRs per family.
    pub fn check_ebpf_capacities(&self) -> Result<(), String> {
        for (what, ranges) in [
            ("excluded ports", &self.excluded_ports),
            ("excluded inbound ports", &self.inbound_exclusions()),
        ] {
            let prefixes = ranges.to_prefixes().len();
            if prefixes > MAX_EXCLUDED_PORT_PREFIXES as usize {
                return Err(format!(
                    "too many {what}: {ranges} takes {prefixes} prefixes in the kernel, at most \
                     {MAX_EXCLUDED_PORT_PREFIXES} (merge ranges, or exclude fewer ports)"
                ));
            }
        }
        let v4 = self
            .excluded_cidrs
            .iter()
            .filter(|net| net.addr().is_ipv4())
            .count();
        let v6 = self.excluded_cidrs.len() - v4;
        if v4.max(v6) > MAX_EXCLUDED_CIDRS as usize {
            return Err(format!(
                "too many excluded CIDRs: {v4} IPv4 and {v6} IPv6, at most {MAX_EXCLUDED_CIDRS} \
                 per family"
            ));
        }
        Ok(())
    }
}

/// A list of ports and inclusive port ranges, e.g. `22,8000-8100`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortRanges(pub Vec<RangeInclusive<u16>>);

#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

impl FromStr for PortRanges {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut ranges = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (start, end) = match item.split_once('-') {
                Some((start, end)) => (parse_port(start, item)?, parse_port(end, item)?),
                None => {
                    let port = parse_port(item, item)?;
                    (port, port)
                }
            };
            if start > end {
                return Err(ParseError(format!(
                    "invalid port range '{item}': {start} is greater than {end}"
                )));
            }
            ranges.push(start..=end);
        }
        Ok(PortRanges(ranges))
    }
}

fn parse_port(text: &str, item: &str) -> Result<u16, ParseError> {
    match text.trim().parse::<u16>() {
        Ok(0) => Err(ParseError(format!(
            "invalid port '{item}': port 0 cannot be dialled"
        ))),
        Ok(port) => Ok(port),
        Err(_) => Err(ParseError(format!(
            "invalid port '{item}': expected a number from 1 to 65535 or a range like 8000-8100"
        ))),
    }
}

/// Parses one CIDR (`10.0.0.0/8`, `fd00::/8`) or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<IpNet, ParseError> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net != net.trunc() {
            return Err(ParseError(format!(
                "invalid CIDR '{text}': host bits are set (did you mean {}?)",
                net.trunc()
            )));
        }
        return Ok(net);
    }
    text.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| {
            ParseError(format!(
                "invalid CIDR '{text}': expected e.g. 10.0.0.0/8 or fd00::/8"
            ))
        })
}

impl PortRanges {
    /// Sorted, overlapping and adjacent ranges merged.
    pub fn normalized(&self) -> PortRanges {
        let mut sorted: Vec<(u32, u32)> = self
            .0
            .iter()
            .map(|r| (u32::from(*r.start()), u32::from(*r.end())))
            .collect();
        sorted.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (first, last) in sorted {
            match merged.last_mut() {
                Some(previous) if first <= previous.1 + 1 => previous.1 = previous.1.max(last),
                _ => merged.push((first, last)),
            }
        }
        PortRanges(
            merged
                .into_iter()
                .map(|(first, last)| first as u16..=last as u16)
                .collect(),
        )
    }

    /// The kernel-side representation: prefixes `(length, first port)` of the 16-bit port
    /// that together cover exactly these ports (a range takes at most 30).
    pub fn to_prefixes(&self) -> Vec<(u32, u16)> {
        let mut prefixes = Vec::new();
        for range in &self.normalized().0 {
            let (mut start, end) = (u32::from(*range.start()), u32::from(*range.end()));
            while start <= end {
                // The largest aligned block starting at `start` that stays inside the range.
                let mut bits = start.trailing_zeros().min(16);
                while start + (1 << bits) - 1 > end {
                    bits -= 1;
                }
                prefixes.push((16 - bits, start as u16));
                start += 1 << bits;
            }
        }
        prefixes
    }

    /// The ranges kernel-side prefixes cover (the inverse of `to_prefixes`).
    pub fn from_prefixes(prefixes: &[(u32, u16)]) -> PortRanges {
        let ranges = prefixes
            .iter()
            .map(|&(len, first)| {
                let size = 1u32 << (16 - len.min(16));
                first..=(u32::from(first) + size - 1) as u16
            })
            .collect();
        PortRanges(ranges).normalized()
    }

    /// `22,8000:8100` as iptables' multiport match wants it (ranges with a colon).
    pub fn multiport_lists(&self) -> Vec<String> {
        // multiport takes at most 15 ports per rule, a range counting as two.
        let mut lists = Vec::new();
        let mut current: Vec<String> = Vec::new();
        let mut slots = 0;
        for range in &self.0 {
            let (item, cost) = if range.start() == range.end() {
                (range.start().to_string(), 1)
            } else {
                (format!("{}:{}", range.start(), range.end()), 2)
            };
            if slots + cost > 15 {
                lists.push(current.join(","));
                current.clear();
                slots = 0;
            }
            current.push(item);
            slots += cost;
        }
        if !current.is_empty() {
            lists.push(current.join(","));
        }
        lists
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_ranges() {
        let ranges: PortRanges = "22, 8000-8100,9090".parse().unwrap();
        assert_eq!(ranges.0, vec![22..=22, 8000..=8100, 9090..=9090]);
        assert_eq!(ranges.to_string(), "22,8000-8100,9090");
        assert!("".parse::<PortRanges>().unwrap().0.is_empty());
    }

    #[test]
    fn rejects_bad_ports_with_the_reason() {
        let err = |s: &str| s.parse::<PortRanges>().unwrap_err().to_string();
        assert!(err("70000").contains("'70000'"), "{}", err("70000"));
        assert!(err("0").contains("port 0"));
        assert!(err("9000-8000").contains("9000 is greater than 8000"));
        assert!(err("http").contains("expected a number"));
        assert!(err("1-").contains("'1-'"));
    }

    #[test]
    fn settings_beyond_the_kernel_capacities_are_refused() {
        let mut settings = CaptureSettings {
            outbound_port: 15001,
            proxy_uid: None,
            proxy_gid: None,
            excluded_ports: PortRanges::default(),
            excluded_cidrs: Vec::new(),
            inbound_port: Some(15006),
            excluded_inbound_ports: PortRanges::default(),
            when_proxy_down: WhenProxyDown::Refuse,
        };
        assert_eq!(settings.check_ebpf_capacities(), Ok(()));
        // Every odd port is its own prefix: 32768 of them.
        settings.excluded_ports = PortRanges((1..=65535).step_by(2).map(|p| p..=p).collect());
        assert!(
            settings
                .check_ebpf_capacities()
                .unwrap_err()
                .contains("too many excluded ports")
        );
        settings.excluded_ports = PortRanges::default();
        settings.excluded_cidrs = (0..=1024u32)
            .map(|i| IpNet::new(std::net::Ipv4Addr::from(i << 8).into(), 24).unwrap())
            .collect();
        assert!(
            settings
                .check_ebpf_capacities()
                .unwrap_err()
                .contains("1025 IPv4")
        );
    }

    #[test]
    fn prefixes_cover_exactly_the_excluded_ports() {
        let ranges: PortRanges = "1,63-65,65535,8000-8100,1-65535".parse().unwrap();
        let all = PortRanges::from_prefixes(&ranges.to_prefixes());
        assert_eq!(all.to_string(), "1-65535");
        let ranges: PortRanges = "65535,1,63-65,8000-8100,64".parse().unwrap();
        let prefixes = ranges.to_prefixes();
        let covered = |p: u16| {
            prefixes.iter().any(|&(len, first)| {
                len <= 16 && (p ^ first).checked_shr(16 - len).unwrap_or(0) == 0
            })
        };
        for p in [1, 63, 64, 65, 8000, 8050, 8100, 65535] {
            assert!(covered(p), "port {p}");
        }
        for p in [0, 2, 62, 66, 7999, 8101, 65534] {
            assert!(!covered(p), "port {p}");
        }
        assert_eq!(
            PortRanges::from_prefixes(&prefixes).to_string(),
            "1,63-65,8000-8100,65535"
        );
        // A range costs at most 30 prefixes: 2 * 16 - 2.
        assert!("1-65534".parse::<PortRanges>().unwrap().to_prefixes().len() <= 30);
    }

    #[test]
    fn multiport_lists_respect_the_fifteen_slot_limit() {
        let many: PortRanges = (1..=20)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .unwrap();
        let lists = many.multiport_lists();
        assert_eq!(lists.len(), 2);
        assert_eq!(lists[0].split(',').count(), 15);
        let ranges: PortRanges = "1-2,3-4,5-6,7-8,9-10,11-12,13-14,15".parse().unwrap();
        assert_eq!(
            ranges.multiport_lists().len(),
            1,
            "seven ranges and a port fill 15 slots"
        );
        let ranges: PortRanges = "1-2,3-4,5-6,7-8,9-10,11-12,13-14,15,16".parse().unwrap();
        assert_eq!(ranges.multiport_lists().len(), 2);
    }

    #[test]
    fn parses_cidrs_and_bare_addresses() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(
            parse_cidr("198.18.0.3").unwrap().to_string(),
            "198.18.0.3/32"
        );
        assert!(
            parse_cidr("10.0.0.1/8")
                .unwrap_err()
                .to_string()
                .contains("host bits")
        );
        assert!(
            parse_cidr("10.0.0.0/33")
                .unwrap_err()
                .to_string()
                .contains("invalid CIDR")
        );
        assert!(parse_cidr("nonsense").is_err());
    }
}
