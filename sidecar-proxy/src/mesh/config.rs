//! The mesh config file (`--mesh-config`, YAML; format in docs/MESH_CONFIG.md): this workload's
//! certificate files, which destinations are mesh workloads (and who they must prove to be), and
//! the inbound policy and authorization per port.
//!
//! Every value is checked while it is deserialized, so an error carries the line and column of
//! the offending value.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    num::NonZeroU16,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::{
    http::{HttpConfig, config::RateLimit},
    mesh::authz::{AllowRule, Authorization},
    mesh::identity::{SpiffeId, validate_segment, validate_trust_domain},
};

/// A mesh config file that could not be used, with where and why.
#[derive(Debug, Error)]
#[error("mesh config {}{}: {message}", path.display(), location.map(|(line, column)| format!(" line {line} column {column}")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column, when the problem is at one place in the file.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

/// The validated mesh config.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfig {
    /// With `identity`: mesh mTLS. Both absent: plaintext, for HTTP routing alone.
    pub trust_domain: Option<String>,
    pub identity: Option<IdentityFiles>,
    /// Outbound destinations that get mTLS; the first match wins.
    pub workloads: Vec<Workload>,
    pub inbound: InboundPolicy,
    /// HTTP protocol overrides, services and routes (docs/ROUTING.md).
    pub http: HttpConfig,
    /// TLS 1.3 session resumption between sidecars (`sessionResumption`, default on).
    pub session_resumption: bool,
}

/// This workload's certificate, key and trust bundles, as absolute paths (relative paths in the
/// file are taken from the file's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// PEM: the workload certificate first, then any intermediates.
    pub certificate_chain: PathBuf,
    /// PEM: the private key (PKCS#8, SEC1 or PKCS#1).
    pub private_key: PathBuf,
    /// PEM: the roots of the mesh's trust domain; several during a CA rotation.
    pub trust_bundle: PathBuf,
    /// PEM: the roots of each federated trust domain, trusted for that domain's identities only.
    pub federated_trust_bundles: BTreeMap<String, PathBuf>,
}

impl IdentityFiles {
    /// Every file: the chain, the key, our trust bundle, then the federated bundles in the
    /// order of their trust domains.
    pub fn paths(&self) -> Vec<&Path> {
        [
            &self.certificate_chain,
            &self.private_key,
            &self.trust_bundle,
        ]
        .into_iter()
        .chain(self.federated_trust_bundles.values())
        .map(PathBuf::as_path)
        .collect()
    }
}

/// A mesh workload (or a service's virtual IPs): where it is and who it must be.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawWorkload")]
pub struct Workload {
    pub name: String,
    pub addresses: Vec<IpNet>,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// The server must present one of these.
    pub identities: Vec<SpiffeId>,
}

impl Workload {
    pub fn matches(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        (self.ports.is_empty() || self.ports.contains(&addr.port()))
            && self.addresses.iter().any(|net| net.contains(&ip))
    }
}

/// How an inbound port treats plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InboundMode {
    /// Only mesh mTLS.
    Strict,
    /// Mesh mTLS and plaintext, told apart by the first bytes (Istio's default).
    #[default]
    Permissive,
}

impl InboundMode {
    pub const fn name(self) -> &'static str {
        match self {
            InboundMode::Strict => "STRICT",
            InboundMode::Permissive => "PERMISSIVE",
        }
    }
}

impl fmt::Display for InboundMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The policy of one inbound port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
    pub mode: InboundMode,
    pub authorization: Authorization,
    /// TLS terminated for any client with the port's own certificate (mesh mTLS is still told
    /// apart by its ALPN); plaintext is then refused.
    pub server_tls: Option<ServerTls>,
    /// The app listens on this loopback address (same port) rather than the pod IP.
    pub forward_to: Option<IpAddr>,
    /// A token bucket for the port's HTTP requests (429, flag `RL`).
    pub rate_limit: Option<RateLimit>,
}

/// An inbound port's server TLS (Istio's `ServerTLSSettings`, SIMPLE, or MUTUAL with
/// `caCertificates`), as absolute paths.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    /// PEM: the server certificate first, then any intermediates.
    pub server_certificate: PathBuf,
    /// PEM: its private key (PKCS#8, SEC1 or PKCS#1).
    pub private_key: PathBuf,
    /// PEM: the roots client certificates must lead to; absent: no client certificate asked.
    pub ca_certificates: Option<PathBuf>,
    /// Offered in ALPN, in order of preference. The app hears the protocol the client picks
    /// (no translation), so only a port whose app speaks h2c should offer `h2`.
    #[serde(default = "http1_only")]
    pub alpn: Vec<ServerAlpn>,
}

fn http1_only() -> Vec<ServerAlpn> {
    vec![ServerAlpn::Http1]
}

/// An ALPN protocol an inbound port can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ServerAlpn {
    #[serde(rename = "h2")]
    Http2,
    #[serde(rename = "http/1.1")]
    Http1,
}

impl ServerAlpn {
    pub const fn id(self) -> &'static [u8] {
        match self {
            ServerAlpn::Http2 => b"h2",
            ServerAlpn::Http1 => b"http/1.1",
        }
    }
}

impl ServerTls {
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        [&self.server_certificate, &self.private_key]
            .into_iter()
            .chain(&self.ca_certificates)
            .map(PathBuf::as_path)
    }

    fn resolve_paths(&mut self, base: &Path) -> Result<(), String> {
        for path in [&mut self.server_certificate, &mut self.private_key]
            .into_iter()
            .chain(&mut self.ca_certificates)
        {
            if path.as_os_str().is_empty() {
                return Err("a `tls` file path is empty".into());
            }
            *path = base.join(&*path);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundPolicy {
    /// For ports not listed.
    pub default_mode: InboundMode,
    pub ports: BTreeMap<u16, PortPolicy>,
}

impl InboundPolicy {
    /// Unlisted ports get the default mode and no authorization rules.
    pub fn port(&self, port: u16) -> PortPolicy {
        self.ports.get(&port).cloned().unwrap_or(PortPolicy {
            mode: self.default_mode,
            ..PortPolicy::default()
        })
    }
}

impl MeshConfig {
    /// Parses `text`, read from `path` (relative certificate paths are taken from its directory).
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, ConfigError> {
        // An empty file is a truncated write or an empty mount, never a wish for plaintext.
        if text.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError {
                path: path.to_owned(),
                location: None,
                message: "the file is empty".into(),
            });
        }
        let raw: RawMeshConfig = serde_yaml::from_slice(text).map_err(|error| {
            let location = error.location().map(|l| (l.line(), l.column()));
            let mut message = error.to_string();
            // serde_yaml appends the location in words; it is already in the prefix.
            if let Some((line, column)) = location {
                let suffix = format!(" at line {line} column {column}");
                if let Some(stripped) = message.strip_suffix(&suffix) {
                    message = stripped.to_owned();
                }
            }
            ConfigError {
                path: path.to_owned(),
                location,
                message,
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let whole_file = |message: &str| ConfigError {
            path: path.to_owned(),
            location: None,
            message: message.to_owned(),
        };
        let (trust_domain, identity) = match (raw.trust_domain, raw.identity) {
            (Some(trust_domain), Some(identity)) => (Some(trust_domain.0), Some(identity)),
            (None, None) => (None, None),
            (Some(_), None) => {
                return Err(whole_file(
                    "`trustDomain` without `identity`: give both for mTLS, or neither for plaintext",
                ));
            }
            (None, Some(_)) => return Err(whole_file("`identity` needs `trustDomain`")),
        };
        if let (Some(trust_domain), Some(identity)) = (&trust_domain, &identity)
            && identity
                .federated_trust_bundles
                .contains_key(&TrustDomain(trust_domain.clone()))
        {
            return Err(whole_file(&format!(
                "`identity.federatedTrustBundles` lists the mesh's own trust domain {trust_domain}: its roots are `identity.trustBundle`"
            )));
        }
        if identity.is_none() {
            let strict = raw.inbound.mode == InboundMode::Strict
                || raw
                    .inbound
                    .ports
                    .0
                    .iter()
                    .any(|p| p.mode == Some(InboundMode::Strict));
            let needs_mtls = [
                (!raw.workloads.is_empty(), "`workloads` (mTLS destinations)"),
                (strict, "STRICT inbound mode"),
                (
                    raw.inbound.ports.0.iter().any(|p| p.allow.is_some()),
                    "`allow` rules",
                ),
            ];
            if let Some((_, what)) = needs_mtls.iter().find(|(present, _)| *present) {
                return Err(whole_file(&format!(
                    "{what} need mesh mTLS: add `trustDomain` and `identity`"
                )));
            }
        }
        // Only read by allow rules, which need an identity (checked above).
        let mesh_trust_domain = trust_domain.clone().unwrap_or_default();
        let inbound = InboundPolicy {
            default_mode: raw.inbound.mode,
            ports: raw
                .inbound
                .ports
                .0
                .into_iter()
                .map(|port| {
                    let authorization = match port.allow {
                        None => Authorization::AllowAll,
                        Some(rules) => Authorization::AllowOnly(
                            rules
                                .into_iter()
                                .map(|rule| rule.resolve(&mesh_trust_domain))
                                .collect(),
                        ),
                    };
                    let mut server_tls = port.tls;
                    if let Some(tls) = &mut server_tls {
                        tls.resolve_paths(base).map_err(|error| {
                            whole_file(&format!("inbound port {}: {error}", port.port))
                        })?;
                    }
                    let policy = PortPolicy {
                        mode: port.mode.unwrap_or(raw.inbound.mode),
                        authorization,
                        server_tls,
                        forward_to: port.forward_to.map(|loopback| loopback.0),
                        rate_limit: port.rate_limit,
                    };
                    Ok((port.port.get(), policy))
                })
                .collect::<Result<_, ConfigError>>()?,
        };
        let mut http = raw.http;
        for tls in http.services.iter_mut().filter_map(|s| s.tls.as_mut()) {
            tls.resolve_paths(base);
        }
        Ok(MeshConfig {
            identity: identity.map(|files| IdentityFiles {
                certificate_chain: base.join(files.certificate_chain),
                private_key: base.join(files.private_key),
                trust_bundle: base.join(files.trust_bundle),
                federated_trust_bundles: files
                    .federated_trust_bundles
                    .into_iter()
                    .map(|(trust_domain, path)| (trust_domain.0, base.join(path)))
                    .collect(),
            }),
            trust_domain,
            workloads: raw.workloads,
            inbound,
            http,
            session_resumption: raw.session_resumption,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMeshConfig {
    trust_domain: Option<TrustDomain>,
    identity: Option<RawIdentityFiles>,
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    inbound: RawInbound,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default = "resumption_default")]
    session_resumption: bool,
}

/// Resumption is on unless a policy forbids it: every resumed handshake still proves the
/// identity of a full one, within one certificate and trust bundle (tls/mod.rs).
fn resumption_default() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIdentityFiles {
    certificate_chain: PathBuf,
    private_key: PathBuf,
    trust_bundle: PathBuf,
    #[serde(default)]
    federated_trust_bundles: BTreeMap<TrustDomain, PathBuf>,
}

#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(try_from = "String")]
struct TrustDomain(String);

impl TryFrom<String> for TrustDomain {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        validate_trust_domain(&text).map_err(|error| error.to_string())?;
        Ok(TrustDomain(text))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWorkload {
    name: String,
    addresses: Vec<Address>,
    #[serde(default)]
    ports: Vec<NonZeroU16>,
    identities: Vec<SpiffeId>,
}

impl TryFrom<RawWorkload> for Workload {
    type Error = String;

    fn try_from(raw: RawWorkload) -> Result<Self, String> {
        if raw.name.is_empty() {
            return Err("a workload needs a non-empty `name`".into());
        }
        if raw.addresses.is_empty() {
            return Err(format!("workload {}: `addresses` is empty", raw.name));
        }
        if raw.identities.is_empty() {
            return Err(format!(
                "workload {}: `identities` is empty; list the SPIFFE IDs it may present",
                raw.name
            ));
        }
        Ok(Workload {
            name: raw.name,
            addresses: raw.addresses.into_iter().map(|a| a.0).collect(),
            ports: raw.ports.into_iter().map(NonZeroU16::get).collect(),
            identities: raw.identities,
        })
    }
}

/// An IP address (a host) or a CIDR (shared with the HTTP routing config).
#[derive(Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct Address(pub(crate) IpNet);

impl TryFrom<String> for Address {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let parsed = if text.contains('/') {
            text.parse::<IpNet>().map_err(|e| e.to_string())
        } else {
            text.parse::<IpAddr>()
                .map(|ip| IpNet::from(ip.to_canonical()))
                .map_err(|e| e.to_string())
        };
        parsed
            .map(|net| Address(net.trunc()))
            .map_err(|error| format!("invalid address {text:?} (an IP or a CIDR): {error}"))
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawInbound {
    #[serde(default)]
    mode: InboundMode,
    #[serde(default)]
    ports: PortList,
}

/// Inbound port entries, each port at most once.
#[derive(Default, Deserialize)]
#[serde(try_from = "Vec<RawPort>")]
struct PortList(Vec<RawPort>);

impl TryFrom<Vec<RawPort>> for PortList {
    type Error = String;

    fn try_from(ports: Vec<RawPort>) -> Result<Self, String> {
        let mut seen = std::collections::BTreeSet::new();
        for port in &ports {
            if !seen.insert(port.port) {
                return Err(format!("inbound port {} is listed twice", port.port));
            }
        }
        Ok(PortList(ports))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPort {
    port: NonZeroU16,
    /// Default: the inbound default mode.
    mode: Option<InboundMode>,
    /// Absent: everyone; present: only these (empty: nobody).
    allow: Option<Vec<RawAllowRule>>,
    tls: Option<ServerTls>,
    forward_to: Option<LoopbackIp>,
    rate_limit: Option<RateLimit>,
}

/// `forwardTo`: only loopback, the one address a pod-IP destination can be swapped for without
/// sending the app's traffic somewhere the pod does not own.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct LoopbackIp(IpAddr);

impl TryFrom<String> for LoopbackIp {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() => Ok(LoopbackIp(ip)),
            _ => Err(format!(
                "`forwardTo` {text:?} is not a loopback address (127.0.0.1 or ::1)"
            )),
        }
    }
}

/// `principal`, or `namespace` (with an optional `trustDomain`), or `trustDomain` alone.
#[derive(Deserialize)]
#[serde(try_from = "RawAllowRuleFields")]
enum RawAllowRule {
    Principal(SpiffeId),
    Namespace {
        trust_domain: Option<String>,
        namespace: String,
    },
    TrustDomain(String),
}

impl RawAllowRule {
    /// A namespace rule without a trust domain means the mesh's own.
    fn resolve(self, mesh_trust_domain: &str) -> AllowRule {
        match self {
            RawAllowRule::Principal(id) => AllowRule::Principal(id),
            RawAllowRule::Namespace {
                trust_domain,
                namespace,
            } => AllowRule::Namespace {
                trust_domain: trust_domain.unwrap_or_else(|| mesh_trust_domain.to_owned()),
                namespace,
            },
            RawAllowRule::TrustDomain(trust_domain) => AllowRule::TrustDomain(trust_domain),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAllowRuleFields {
    principal: Option<SpiffeId>,
    namespace: Option<Namespace>,
    trust_domain: Option<TrustDomain>,
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Namespace(String);

impl TryFrom<String> for Namespace {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        validate_segment("namespace", &text).map_err(|error| error.to_string())?;
        Ok(Namespace(text))
    }
}

impl TryFrom<RawAllowRuleFields> for RawAllowRule {
    type Error = String;

    fn try_from(raw: RawAllowRuleFields) -> Result<Self, String> {
        let trust_domain = raw.trust_domain.map(|td| td.0);
        match (raw.principal, raw.namespace, trust_domain) {
            (Some(id), None, None) => Ok(RawAllowRule::Principal(id)),
            (Some(_), _, _) => Err(
                "an allow rule with `principal` cannot also have `namespace` or `trustDomain`"
                    .into(),
            ),
            (None, Some(namespace), trust_domain) => Ok(RawAllowRule::Namespace {
                trust_domain,
                namespace: namespace.0,
            }),
            (None, None, Some(trust_domain)) => Ok(RawAllowRule::TrustDomain(trust_domain)),
            (None, None, None) => {
                Err("an allow rule needs `principal`, `namespace` or `trustDomain`".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/sidecar/mesh.yaml";

    fn parse(text: &str) -> Result<MeshConfig, ConfigError> {
        MeshConfig::parse(text.as_bytes(), Path::new(PATH))
    }

    const FULL: &str = "\
trustDomain: cluster.local
identity:
  certificateChain: certs/cert-chain.pem
  privateKey: /secret/key.pem
  trustBundle: certs/root-cert.pem
  federatedTrustBundles:
    partner.example: certs/partner-root.pem
    other.example: /bundles/other.pem
workloads:
  - name: server
    addresses: [198.18.0.2, 'fd18::2', 10.96.0.0/16]
    ports: [8080]
    identities: [spiffe://cluster.local/ns/default/sa/server]
  - name: anything-else-in-the-pod-cidr
    addresses: [198.18.0.0/24]
    identities:
      - spiffe://cluster.local/ns/default/sa/a
      - spiffe://cluster.local/ns/default/sa/b
inbound:
  mode: STRICT
  ports:
    - port: 8080
      allow:
        - principal: spiffe://cluster.local/ns/default/sa/client
        - namespace: prod
        - namespace: default
          trustDomain: partner.example
        - trustDomain: other.example
    - port: 15021
      mode: PERMISSIVE
    - port: 9090
      allow: []
";

    #[test]
    fn the_access_log_is_off_unless_asked_for() -> Result<(), ConfigError> {
        assert!(!parse(FULL)?.http.access_log);
        assert!(!parse("http: {}\n")?.http.access_log);
        assert!(parse("http: {accessLog: true}\n")?.http.access_log);
        Ok(())
    }

    #[test]
    fn a_full_config_parses() -> Result<(), ConfigError> {
        let config = parse(FULL)?;
        assert_eq!(config.trust_domain.as_deref(), Some("cluster.local"));
        let identity = config.identity.as_ref().expect("identity files");
        assert_eq!(
            identity.certificate_chain,
            Path::new("/etc/sidecar/certs/cert-chain.pem")
        );
        assert_eq!(identity.private_key, Path::new("/secret/key.pem"));
        assert_eq!(
            identity.federated_trust_bundles,
            BTreeMap::from([
                ("other.example".into(), PathBuf::from("/bundles/other.pem")),
                (
                    "partner.example".into(),
                    PathBuf::from("/etc/sidecar/certs/partner-root.pem")
                ),
            ])
        );
        assert_eq!(
            identity.paths().last(),
            Some(&Path::new("/etc/sidecar/certs/partner-root.pem")),
            "the federated bundles are watched and loaded too"
        );
        assert_eq!(config.workloads.len(), 2);
        assert_eq!(config.workloads[0].addresses.len(), 3);

        let at = |text: &str| text.parse::<SocketAddr>().expect("address");
        assert!(config.workloads[0].matches(at("198.18.0.2:8080")));
        assert!(config.workloads[0].matches(at("[::ffff:198.18.0.2]:8080")));
        assert!(config.workloads[0].matches(at("[fd18::2]:8080")));
        assert!(config.workloads[0].matches(at("10.96.3.4:8080")));
        assert!(!config.workloads[0].matches(at("198.18.0.2:9090")));
        assert!(config.workloads[1].matches(at("198.18.0.7:1")));
        assert!(!config.workloads[1].matches(at("198.18.1.7:1")));

        let strict_8080 = config.inbound.port(8080);
        assert_eq!(strict_8080.mode, InboundMode::Strict);
        let Authorization::AllowOnly(rules) = strict_8080.authorization else {
            panic!("8080 has rules");
        };
        assert_eq!(
            rules,
            vec![
                AllowRule::Principal(
                    "spiffe://cluster.local/ns/default/sa/client"
                        .parse()
                        .expect("id")
                ),
                AllowRule::Namespace {
                    trust_domain: "cluster.local".into(),
                    namespace: "prod".into()
                },
                AllowRule::Namespace {
                    trust_domain: "partner.example".into(),
                    namespace: "default".into()
                },
                AllowRule::TrustDomain("other.example".into()),
            ]
        );
        assert_eq!(config.inbound.port(15021).mode, InboundMode::Permissive);
        assert_eq!(
            config.inbound.port(15021).authorization,
            Authorization::AllowAll
        );
        assert_eq!(
            config.inbound.port(9090).authorization,
            Authorization::AllowOnly(Vec::new())
        );
        assert_eq!(
            config.inbound.port(1234),
            PortPolicy {
                mode: InboundMode::Strict,
                ..PortPolicy::default()
            }
        );
        Ok(())
    }

    #[test]
    fn an_inbound_port_takes_server_tls_forward_to_and_a_rate_limit() -> Result<(), ConfigError> {
        let config = parse(
            "inbound:
  ports:
    - port: 8080
      tls:
        serverCertificate: tls/tls.crt
        privateKey: /secret/tls.key
        caCertificates: tls/ca.crt
        alpn: [h2, http/1.1]
      forwardTo: 127.0.0.1
      rateLimit: {requestsPerSecond: 10, burst: 20}
    - port: 9090
      tls: {serverCertificate: c.pem, privateKey: k.pem}
      forwardTo: '::1'
",
        )?;
        let port = config.inbound.port(8080);
        assert_eq!(
            port.server_tls,
            Some(ServerTls {
                server_certificate: "/etc/sidecar/tls/tls.crt".into(),
                private_key: "/secret/tls.key".into(),
                ca_certificates: Some("/etc/sidecar/tls/ca.crt".into()),
                alpn: vec![ServerAlpn::Http2, ServerAlpn::Http1],
            })
        );
        assert_eq!(port.forward_to, Some(IpAddr::from([127, 0, 0, 1])));
        let limit = port.rate_limit.expect("rate limit");
        assert_eq!(
            (limit.requests_per_second.get(), limit.burst.get()),
            (10, 20)
        );
        let other = config.inbound.port(9090);
        let tls = other.server_tls.expect("tls");
        assert_eq!(
            (tls.ca_certificates, tls.alpn),
            (None, vec![ServerAlpn::Http1]),
            "no client certificate asked; HTTP/1.1 only, what a legacy app speaks"
        );
        assert_eq!(other.forward_to, Some(std::net::Ipv6Addr::LOCALHOST.into()));
        assert_eq!(config.inbound.port(1234).server_tls, None);
        Ok(())
    }

    #[test]
    fn bad_inbound_port_settings_are_rejected_with_the_reason() {
        for (port, reason, line) in [
            (
                "{port: 80, forwardTo: 198.18.0.9}",
                "`forwardTo` \"198.18.0.9\" is not a loopback address",
                Some(3),
            ),
            (
                "{port: 80, tls: {serverCertificate: c.pem}}",
                "missing field `privateKey`",
                Some(3),
            ),
            (
                "{port: 80, tls: {serverCertificate: c.pem, privateKey: k.pem, alpn: [h3]}}",
                "unknown variant `h3`",
                Some(3),
            ),
            (
                "{port: 80, tls: {serverCertificate: '', privateKey: k.pem}}",
                "inbound port 80: a `tls` file path is empty",
                None,
            ),
            (
                "{port: 80, rateLimit: {requestsPerSecond: 0}}",
                "`rateLimit.requestsPerSecond` must be above 0",
                Some(3),
            ),
        ] {
            let text = format!("inbound:\n  ports:\n    - {port}\n");
            let error = parse(&text).expect_err(port);
            assert_eq!(error.location.map(|(line, _)| line), line, "{error}");
            assert!(error.to_string().contains(reason), "{error}");
        }
    }

    #[test]
    fn the_inbound_section_defaults_to_permissive_without_rules() -> Result<(), ConfigError> {
        let config = parse(
            "trustDomain: td\nidentity: {certificateChain: c, privateKey: k, trustBundle: b}\n",
        )?;
        assert!(config.workloads.is_empty());
        assert_eq!(config.inbound, InboundPolicy::default());
        assert_eq!(config.inbound.port(80).mode, InboundMode::Permissive);
        Ok(())
    }

    /// Replaces the first occurrence of `from` in the full example with `to`, and expects an
    /// error pointing at the line of `anchor` (the value itself; for a check of a whole entry,
    /// where the enclosing node starts), whose message contains `reason`.
    fn assert_rejected(from: &str, to: &str, anchor: &str, reason: &str) {
        let line_of = |text: &str| {
            let at = FULL.find(text).expect("the text is in the example");
            FULL[..at].matches('\n').count() + 1
        };
        let line = line_of(anchor);
        let text = FULL.replacen(from, to, 1);
        let error = parse(&text).expect_err(&format!("accepted with {to:?}"));
        let shown = error.to_string();
        assert_eq!(
            error.location.map(|(l, _)| l),
            Some(line),
            "wrong line for {to:?}: {shown}"
        );
        assert!(shown.contains(reason), "{shown:?} lacks {reason:?}");
        assert!(shown.starts_with(&format!("mesh config {PATH} line {line} column ")));
    }

    #[test]
    fn bad_values_are_rejected_with_their_line_and_the_reason() {
        let cases = [
            ("mode: STRICT", "mode: STRCT", "unknown variant `STRCT`"),
            (
                "trustDomain: cluster.local",
                "trustDomain: Cluster",
                "invalid trust domain",
            ),
            (
                "trustDomain: cluster.local",
                "trustDomian: x",
                "unknown field `trustDomian`",
            ),
            (
                "198.18.0.2, ",
                "198.18.0.300, ",
                "invalid address \"198.18.0.300\"",
            ),
            ("10.96.0.0/16", "10.96.0.0/33", "invalid address"),
            (
                "partner.example: certs",
                "Partner.Example: certs",
                "invalid trust domain \"Partner.Example\"",
            ),
            ("ports: [8080]", "ports: [0]", "nonzero"),
            ("ports: [8080]", "ports: [70000]", "70000"),
            (
                "[spiffe://cluster.local/ns/default/sa/server]",
                "[spiffe://cluster.local/default/server]",
                "not an Istio-style SPIFFE ID",
            ),
            (
                "- principal: spiffe",
                "- principal: https",
                "must start with `spiffe://`",
            ),
            (
                "- namespace: prod",
                "- namespace: ../x",
                "invalid namespace \"../x\"",
            ),
            (
                "      mode: PERMISSIVE",
                "      mod: PERMISSIVE",
                "unknown field `mod`",
            ),
        ];
        for (from, to, reason) in cases {
            assert_rejected(from, to, from, reason);
        }
    }

    #[test]
    fn bad_entries_are_rejected_at_their_list_with_the_reason() {
        assert_rejected(
            "- namespace: prod",
            "- {}",
            "        - principal:",
            "inbound.ports[0].allow: an allow rule needs `principal`, `namespace` or `trustDomain`",
        );
        assert_rejected(
            "    - port: 9090",
            "    - port: 8080",
            "  mode: STRICT",
            "inbound: inbound port 8080 is listed twice",
        );
        assert_rejected(
            "identities: [spiffe://cluster.local/ns/default/sa/server]",
            "identities: []",
            "  - name: server",
            "workloads: workload server: `identities` is empty",
        );
    }

    #[test]
    fn without_identity_the_config_is_plaintext_routing_only() -> Result<(), ConfigError> {
        let config = parse("http:\n  services: [{name: web}]\n")?;
        assert_eq!(config.identity, None);
        assert_eq!(config.http.services.len(), 1);
        for (text, reason) in [
            (
                "workloads: [{name: w, addresses: [10.0.0.1], identities: [spiffe://td/ns/a/sa/b]}]\n",
                "`workloads` (mTLS destinations) need mesh mTLS",
            ),
            (
                "inbound: {mode: STRICT}\n",
                "STRICT inbound mode need mesh mTLS",
            ),
            (
                "inbound: {ports: [{port: 80, allow: []}]}\n",
                "`allow` rules need mesh mTLS",
            ),
        ] {
            let error = parse(text).expect_err(reason);
            assert!(error.to_string().contains(reason), "{error}");
        }
        Ok(())
    }

    /// The proxy adds each duration to the present moment (a request's deadline, the end of an
    /// ejection, an idle connection's expiry): one that overflows the clock is refused at its
    /// line, as Envoy refuses more than protobuf's 10000 years, instead of panicking the proxy
    /// at the first request.
    #[test]
    fn durations_beyond_ten_thousand_years_are_rejected_with_their_line() {
        // Service on line 3, route on line 5 (a duration's error points at its mapping).
        let config = |service: &str, route: &str| {
            format!(
                "http:\n  services:\n    - {{name: web, {service}}}\n  routes:\n    \
                 - {{name: r, destinations: [{{service: web}}], {route}}}\n"
            )
        };
        let longest = parse(&config("app: a", "timeout: 10000y")).expect("protobuf's longest");
        assert_eq!(
            longest.http.routes[0].timeout,
            Some(std::time::Duration::from_secs(315_576_000_000))
        );
        for (service, route, line) in [
            ("outlierDetection: {ejectionTime: 20000y}", "timeout: 1s", 3),
            (
                "connectionPool: {idleTimeout: 315576000001s}",
                "timeout: 1s",
                3,
            ),
            ("app: a", "timeout: 500000000000y", 5),
            ("app: a", "retries: {attempts: 1, perTryTimeout: 20000y}", 5),
        ] {
            let text = config(service, route);
            let error = parse(&text).expect_err(&text);
            assert_eq!(error.location.map(|(l, _)| l), Some(line), "{error}");
            assert!(
                error.to_string().contains("longer than 10000 years"),
                "{error}"
            );
        }
    }

    /// Fuzz target `mesh_config` (`cargo xtask fuzz`; under `cargo test`: its corpus and a
    /// second of random inputs). Any file is a config or an error that points inside the file;
    /// an accepted config routes requests, and each of its durations can be added to the
    /// present moment as the proxy does (a deadline, an ejection's end).
    #[test]
    fn fuzz_mesh_config() {
        let orig_dst = "198.18.0.2:8080".parse().expect("address");
        bolero::check!(name = "mesh_config").for_each(|input: &[u8]| {
            let config = match MeshConfig::parse(input, Path::new(PATH)) {
                Ok(config) => config,
                Err(error) => {
                    // At most one past the last line (where YAML reports the end of the
                    // input); any of YAML's line breaks counts, so do \r, NEL, LS and PS.
                    let breaks = input
                        .iter()
                        .filter(|&&b| matches!(b, b'\n' | b'\r'))
                        .count()
                        + input.windows(2).filter(|w| w == b"\xc2\x85").count()
                        + input
                            .windows(3)
                            .filter(|w| w[..2] == *b"\xe2\x80" && (w[2] | 1) == 0xa9)
                            .count();
                    if let Some((line, column)) = error.location {
                        assert!((1..=breaks + 2).contains(&line) && column >= 1, "{error}");
                    }
                    assert!(error.to_string().starts_with("mesh config "));
                    return;
                }
            };
            let now = std::time::Instant::now();
            let services = config.http.services.iter().flat_map(|service| {
                [
                    service.connection_pool.idle_timeout,
                    service.outlier_detection.ejection_time,
                ]
            });
            let routes = config.http.routes.iter().flat_map(|route| {
                let retry = route.retries.as_ref().and_then(|r| r.per_try_timeout);
                route.timeout.into_iter().chain(retry)
            });
            for duration in services.chain(routes) {
                assert!(now.checked_add(duration).is_some(), "{duration:?} accepted");
            }
            let request = http::Request::get("/api/v1/items?x=1")
                .header(http::header::HOST, "Web.Example:8080")
                .header("x-version", "v2")
                .body(())
                .expect("request");
            let table = crate::http::router::RouteTable::new(config.http);
            let view = crate::http::router::RequestView::new(&request, orig_dst);
            let _ = table.decide(&view);
        });
    }

    #[test]
    fn service_tls_takes_its_defaults_and_paths_from_the_config_directory()
    -> Result<(), ConfigError> {
        use crate::http::config::{ServiceTls, TlsMode};
        let config = parse(
            "http:
  services:
    - name: partner
      hosts: [api.partner, partner]
      addresses: [203.0.113.7]
      ports: [80]
      targetPort: 443
      tls: {mode: SIMPLE, caCertificates: partner/ca.pem}
    - name: by-ip
      addresses: [203.0.113.8]
      tls:
        mode: MUTUAL
        caCertificates: /partner/ca.pem
        clientCertificate: /partner/client.pem
        privateKey: client-key.pem
    - name: public
      hosts: [api.example.com]
      tls: {mode: SIMPLE, sni: edge.example.com}
",
        )?;
        let services = &config.http.services;
        assert_eq!(
            services[0].tls,
            Some(ServiceTls {
                mode: TlsMode::Simple,
                sni: Some("api.partner".into()),
                ca_certificates: Some("/etc/sidecar/partner/ca.pem".into()),
                client_certificate: None,
                private_key: None,
            }),
            "the first host is the server name; paths are the config file's"
        );
        let at = |text: &str| text.parse::<SocketAddr>().expect("address");
        assert_eq!(
            services[0].endpoint_for(at("203.0.113.7:80")),
            at("203.0.113.7:443")
        );
        assert_eq!(
            services[1].tls,
            Some(ServiceTls {
                mode: TlsMode::Mutual,
                sni: None,
                ca_certificates: Some("/partner/ca.pem".into()),
                client_certificate: Some("/partner/client.pem".into()),
                private_key: Some("/etc/sidecar/client-key.pem".into()),
            }),
            "without a host, the endpoint's IP is verified"
        );
        assert_eq!(
            services[1].endpoint_for(at("203.0.113.8:8080")),
            at("203.0.113.8:8080"),
            "no targetPort: the original port"
        );
        let public = services[2].tls.as_ref().expect("tls");
        assert_eq!(public.sni.as_deref(), Some("edge.example.com"));
        assert_eq!(public.ca_certificates, None, "the system's roots");
        Ok(())
    }

    #[test]
    fn bad_tls_settings_are_rejected_at_their_service_with_the_reason() {
        for (service, reason) in [
            (
                "{name: p, tls: {mode: ISTIO_MUTUAL}}",
                "unknown variant `ISTIO_MUTUAL`, expected `SIMPLE` or `MUTUAL`",
            ),
            (
                "{name: p, tls: {mode: MUTUAL, caCertificates: ca.pem}}",
                "service p: `tls.mode: MUTUAL` needs `clientCertificate` and `privateKey`",
            ),
            (
                "{name: p, tls: {mode: SIMPLE, privateKey: k.pem}}",
                "service p: `tls.clientCertificate` and `privateKey` go with `mode: MUTUAL`",
            ),
            (
                "{name: p, hosts: ['*.partner'], tls: {mode: SIMPLE}}",
                "service p: the first host \"*.partner\" is not a server name to verify: give `tls.sni`",
            ),
            (
                "{name: p, tls: {mode: SIMPLE, sni: 'a b'}}",
                "service p: invalid `tls.sni` \"a b\"",
            ),
            (
                "{name: p, tls: {mode: SIMPLE, caCertificates: ''}}",
                "service p: a `tls` file path is empty",
            ),
            (
                "{name: p, endpoints: ['10.0.0.1:443'], targetPort: 443}",
                "service p: `targetPort` rewrites the original destination's port",
            ),
            ("{name: p, targetPort: 0}", "nonzero"),
            (
                "{name: p, tls: {mode: SIMPLE, insecureSkipVerify: true}}",
                "unknown field `insecureSkipVerify`",
            ),
        ] {
            let text = format!("http:\n  services:\n    - {service}\n");
            let error = parse(&text).expect_err(service);
            assert_eq!(error.location.map(|(line, _)| line), Some(3), "{error}");
            assert!(error.to_string().contains(reason), "{error}");
        }
    }

    #[test]
    fn the_own_trust_domain_is_not_federated() {
        let text = FULL.replacen("partner.example: certs", "cluster.local: certs", 1);
        let error = parse(&text).expect_err("own trust domain federated");
        assert_eq!(
            error.to_string(),
            "mesh config /etc/sidecar/mesh.yaml: `identity.federatedTrustBundles` lists the mesh's own trust domain cluster.local: its roots are `identity.trustBundle`"
        );
    }

    #[test]
    fn missing_sections_are_reported() {
        let error = parse("trustDomain: td\n").expect_err("no identity");
        assert!(
            error
                .to_string()
                .contains("`trustDomain` without `identity`"),
            "{error}"
        );
        let error = parse("\n").expect_err("empty");
        assert_eq!(
            error.to_string(),
            "mesh config /etc/sidecar/mesh.yaml: the file is empty"
        );
    }
}
