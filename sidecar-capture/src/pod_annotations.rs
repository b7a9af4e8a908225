//! Pod annotations that tune `sidecar init`, read from the downward API file
//! (`fieldRef: metadata.annotations`), Istio's names where Istio has one.
use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use ipnet::IpNet;

use crate::capture_settings::{PortRanges, WhenProxyDown, parse_cidr};

pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const FAIL_POLICY: &str = "sidecar.ebpf/fail-policy";
pub const WHEN_PROXY_DOWN: &str = "sidecar.ebpf/when-proxy-down";

/// What `init` does when it cannot install capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailPolicy {
    /// Exit non-zero: the pod does not start without capture (Kubernetes retries the init).
    Closed,
    /// Log the error and exit 0: the app starts with its traffic not captured.
    Open,
}

/// The settings a pod's annotations add to the command line's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodOverrides {
    pub exclude_ports: PortRanges,
    pub exclude_inbound_ports: PortRanges,
    pub exclude_cidrs: Vec<IpNet>,
    pub fail_policy: Option<FailPolicy>,
    pub when_proxy_down: Option<WhenProxyDown>,
}

/// Reads the downward API annotations file and the overrides it carries.
pub fn read_overrides(path: &std::path::Path) -> Result<PodOverrides> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the pod annotations file {}", path.display()))?;
    let annotations = parse_downward_api(&text)
        .with_context(|| format!("malformed pod annotations file {}", path.display()))?;
    overrides(&annotations)
}

/// The downward API writes one `key="value"` line per annotation, the value quoted as Go's
/// `strconv.Quote` does.
pub fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>> {
    let mut annotations = BTreeMap::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let (key, quoted) = line
            .split_once('=')
            .with_context(|| format!("line {}: expected key=\"value\": {line}", number + 1))?;
        let value =
            unquote(quoted).with_context(|| format!("line {}: bad value for {key}", number + 1))?;
        annotations.insert(key.to_string(), value);
    }
    Ok(annotations)
}

fn unquote(quoted: &str) -> Result<String> {
    let Some(inner) = quoted
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    else {
        bail!("expected a double-quoted value, got {quoted}");
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('"') => out.push('"'),
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            // Go's `%q` writes these four too (any annotation may hold such a character).
            Some('a') => out.push('\x07'),
            Some('b') => out.push('\x08'),
            Some('f') => out.push('\x0c'),
            Some('v') => out.push('\x0b'),
            Some(kind @ ('x' | 'u' | 'U')) => {
                let digits = match kind {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let hex: String = chars.by_ref().take(digits).collect();
                let decoded = u32::from_str_radix(&hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .with_context(|| format!("bad escape \\{kind}{hex}"))?;
                out.push(decoded);
            }
            other => bail!("unsupported escape \\{}", other.unwrap_or(' ')),
        }
    }
    Ok(out)
}

/// Picks the annotations `init` understands; a bad value is an error naming the annotation.
pub fn overrides(annotations: &BTreeMap<String, String>) -> Result<PodOverrides> {
    let mut result = PodOverrides::default();
    let with_name = |key: &str| format!("pod annotation {key}");
    if let Some(value) = annotations.get(EXCLUDE_OUTBOUND_PORTS) {
        result.exclude_ports = value
            .parse()
            .with_context(|| with_name(EXCLUDE_OUTBOUND_PORTS))?;
    }
    if let Some(value) = annotations.get(EXCLUDE_INBOUND_PORTS) {
        result.exclude_inbound_ports = value
            .parse()
            .with_context(|| with_name(EXCLUDE_INBOUND_PORTS))?;
    }
    if let Some(value) = annotations.get(EXCLUDE_OUTBOUND_IP_RANGES) {
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                bail!(
                    "{}: \"*\" (exclude everything) is not supported: remove the sidecar instead",
                    with_name(EXCLUDE_OUTBOUND_IP_RANGES)
                );
            }
            result
                .exclude_cidrs
                .push(parse_cidr(item).with_context(|| with_name(EXCLUDE_OUTBOUND_IP_RANGES))?);
        }
    }
    if let Some(value) = annotations.get(FAIL_POLICY) {
        let policy = FailPolicy::from_str(value.trim(), true).map_err(|_| {
            anyhow::anyhow!(
                "{}: invalid value {value:?}: expected closed or open",
                with_name(FAIL_POLICY)
            )
        })?;
        result.fail_policy = Some(policy);
    }
    if let Some(value) = annotations.get(WHEN_PROXY_DOWN) {
        let choice = WhenProxyDown::from_str(value.trim(), true).map_err(|_| {
            anyhow::anyhow!(
                "{}: invalid value {value:?}: expected refuse or direct",
                with_name(WHEN_PROXY_DOWN)
            )
        })?;
        result.when_proxy_down = Some(choice);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWNWARD_API: &str = r#"kubectl.kubernetes.io/default-container="app"
sidecar.ebpf/fail-policy="open"
sidecar.ebpf/when-proxy-down="direct"
traffic.sidecar.istio.io/excludeInboundPorts="9090"
traffic.sidecar.istio.io/excludeOutboundIPRanges="10.0.0.0/8, fd00::/8"
traffic.sidecar.istio.io/excludeOutboundPorts="5432,8000-8100"
note="a \"quoted\" line\nand \u00e9 \\ done"
"#;

    #[test]
    fn reads_the_downward_api_format() {
        let annotations = parse_downward_api(DOWNWARD_API).unwrap();
        assert_eq!(annotations.len(), 7);
        assert_eq!(annotations["note"], "a \"quoted\" line\nand \u{e9} \\ done");
        assert_eq!(
            annotations["kubectl.kubernetes.io/default-container"],
            "app"
        );
    }

    #[test]
    fn turns_istio_annotations_into_settings() {
        let result = overrides(&parse_downward_api(DOWNWARD_API).unwrap()).unwrap();
        assert_eq!(result.exclude_ports.to_string(), "5432,8000-8100");
        assert_eq!(result.exclude_inbound_ports.to_string(), "9090");
        assert_eq!(result.exclude_cidrs.len(), 2);
        assert_eq!(result.fail_policy, Some(FailPolicy::Open));
        assert_eq!(result.when_proxy_down, Some(WhenProxyDown::Direct));
        assert_eq!(
            overrides(&BTreeMap::new()).unwrap(),
            PodOverrides::default()
        );
    }

    /// Every escape Go's `%q` writes, which the kubelet uses for every annotation of the pod,
    /// ours or not (the `pod_annotations` fuzz target found a vertical tab refused).
    #[test]
    fn reads_every_escape_the_kubelets_go_quoting_writes() {
        // Written by Go 1.19's `fmt.Sprintf("%v=%q\n", ...)`, as fieldpath.FormatMap does.
        let file = r#"escapes="bell \a backspace \b formfeed \f newline \n return \r tab \t vtab \v backslash \\ quote \" nul \x00 del \x7f nbsp \u00a0 zwsp \u200b tag \U000e0001 emoji 😀 é"
sidecar.ebpf/fail-policy="closed""#;
        let annotations = parse_downward_api(file).unwrap();
        assert_eq!(
            annotations["escapes"],
            "bell \x07 backspace \x08 formfeed \x0c newline \n return \r tab \t vtab \x0b \
             backslash \\ quote \" nul \0 del \x7f nbsp \u{a0} zwsp \u{200b} tag \u{e0001} \
             emoji 😀 é"
        );
        let result = overrides(&annotations).unwrap();
        assert_eq!(result.fail_policy, Some(FailPolicy::Closed));
    }

    /// A value quoted as the kubelet writes it: Go's `%q` (`strconv.Quote`), which escapes
    /// `\a \b \f \n \r \t \v \\ \"`, other ASCII controls as `\xHH`, and characters Go does
    /// not print as `\uHHHH` or `\UHHHHHHHH` (that set approximated: controls, the common format
    /// characters, private use; either form reads back the same).
    fn go_quote(value: &str) -> String {
        let unprintable = |c: char| {
            c.is_control()
                || matches!(u32::from(c),
                    0xad | 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x2064 | 0xfeff
                    | 0xe000..=0xf8ff | 0xe0001..=0xe007f | 0xf0000..)
        };
        let mut quoted = String::from('"');
        for c in value.chars() {
            match c {
                '\x07' => quoted.push_str("\\a"),
                '\x08' => quoted.push_str("\\b"),
                '\x0c' => quoted.push_str("\\f"),
                '\n' => quoted.push_str("\\n"),
                '\r' => quoted.push_str("\\r"),
                '\t' => quoted.push_str("\\t"),
                '\x0b' => quoted.push_str("\\v"),
                '\\' => quoted.push_str("\\\\"),
                '"' => quoted.push_str("\\\""),
                c if c.is_ascii_control() => quoted.push_str(&format!("\\x{:02x}", u32::from(c))),
                c if unprintable(c) && u32::from(c) <= 0xffff => {
                    quoted.push_str(&format!("\\u{:04x}", u32::from(c)))
                }
                c if unprintable(c) => quoted.push_str(&format!("\\U{:08x}", u32::from(c))),
                c => quoted.push(c),
            }
        }
        quoted.push('"');
        quoted
    }

    /// Fuzz target `pod_annotations` (`cargo xtask fuzz`; under `cargo test`: its corpus and a
    /// second of random inputs). Any file is annotations or an error; the annotations read
    /// come back the same when the kubelet writes them again; accepted port settings print as
    /// they parse, and their kernel-side prefixes cover exactly their ports.
    #[test]
    fn fuzz_pod_annotations() {
        bolero::check!(name = "pod_annotations").for_each(|input: &[u8]| {
            let Ok(text) = std::str::from_utf8(input) else {
                return; // read_to_string refuses it before parsing
            };
            let Ok(annotations) = parse_downward_api(text) else {
                return;
            };
            let rewritten: String = annotations
                .iter()
                .map(|(key, value)| format!("{key}={}\n", go_quote(value)))
                .collect();
            match parse_downward_api(&rewritten) {
                Ok(again) => assert_eq!(again, annotations, "{rewritten:?}"),
                Err(error) => panic!("{rewritten:?} does not read back: {error:#}"),
            }
            let Ok(result) = overrides(&annotations) else {
                return;
            };
            for ports in [&result.exclude_ports, &result.exclude_inbound_ports] {
                assert_eq!(ports.to_string().parse::<PortRanges>().as_ref(), Ok(ports));
                assert_eq!(
                    PortRanges::from_prefixes(&ports.to_prefixes()),
                    ports.normalized()
                );
            }
        });
    }

    #[test]
    fn bad_values_name_the_annotation() {
        let error = |key: &str, value: &str| {
            let annotations = BTreeMap::from([(key.to_string(), value.to_string())]);
            format!("{:#}", overrides(&annotations).unwrap_err())
        };
        assert!(error(EXCLUDE_OUTBOUND_PORTS, "70000").contains(EXCLUDE_OUTBOUND_PORTS));
        assert!(error(EXCLUDE_OUTBOUND_IP_RANGES, "*").contains("not supported"));
        assert!(error(EXCLUDE_OUTBOUND_IP_RANGES, "10.1.2.3/8").contains("host bits"));
        assert!(error(FAIL_POLICY, "maybe").contains("expected closed or open"));
        let bad = error(WHEN_PROXY_DOWN, "fail-open");
        assert!(
            bad.contains(WHEN_PROXY_DOWN) && bad.contains("expected refuse or direct"),
            "{bad}"
        );
        let malformed = parse_downward_api("no-equals-sign\n").unwrap_err();
        assert!(format!("{malformed:#}").contains("line 1"));
        assert!(parse_downward_api("k=unquoted\n").is_err());
    }
}
