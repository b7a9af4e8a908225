//! The `http` section of the mesh config: per-port protocol overrides, services (endpoints, load
//! balancing, connection limits, ejection) and routes (matches, weighted destinations, timeouts,
//! retries). Every value is checked while it is deserialized, so an error carries its line;
//! cross-references (a route naming an unknown service) are checked for the whole section and
//! reported at its line. Format: docs/ROUTING.md.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    num::{NonZeroU16, NonZeroU32},
    path::{Path, PathBuf},
    sync::{Arc, LazyLock},
    time::Duration,
};

use ipnet::IpNet;

use crate::mesh::config::Address;
use regex::Regex;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize, Serializer};

/// Below the usual app keep-alive timeouts (Node 5 s is the odd one out; Go, nginx, Tomcat and
/// Envoy use 60 s or more), so the proxy closes an idle upstream connection before the app does.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The validated `http` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpConfig {
    /// One `access` log line per HTTP request (off unless asked for, as in Istio's default
    /// profile, Linkerd and Envoy: at thousands of requests/s a line each is a cost, in CPU
    /// and in the log pipeline, that a user chooses).
    pub access_log: bool,
    /// Destination port -> protocol, skipping detection.
    pub ports: BTreeMap<u16, PortProtocol>,
    pub services: Vec<ServiceConfig>,
    /// In order: the first match wins.
    pub routes: Vec<RouteConfig>,
}

/// Checked inside the section's own mapping (not with `try_from`), so that an error about the
/// whole section is reported at the section's line rather than at the top of the file.
impl<'de> Deserialize<'de> for HttpConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SectionVisitor;

        impl<'de> serde::de::Visitor<'de> for SectionVisitor {
            type Value = HttpConfig;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("the `http` section (a mapping)")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<HttpConfig, A::Error> {
                let raw =
                    RawHttpConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                HttpConfig::try_from(raw).map_err(serde::de::Error::custom)
            }
        }

        deserializer.deserialize_map(SectionVisitor)
    }
}

impl HttpConfig {
    pub fn port_protocol(&self, port: u16) -> PortProtocol {
        self.ports.get(&port).copied().unwrap_or_default()
    }
}

/// What a destination port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// Look at the first bytes (bounded by `--sniff-timeout`; the server speaking first ends it).
    #[default]
    Detect,
    /// HTTP/1.x, no detection.
    Http,
    /// HTTP/2 with prior knowledge (h2c), no detection.
    Http2,
    /// Opaque TCP, no detection (server-speaks-first protocols: MySQL, SMTP...).
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// Power of two random choices, the one with fewer requests in flight.
    LeastRequest,
}

/// A destination service: how requests routed to it are spread and limited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawService", rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    /// Authorities (host, lowercase, without port) that mean this service.
    pub hosts: Vec<String>,
    /// Original destinations that mean this service (virtual IPs); empty ports: any port.
    pub addresses: Vec<IpNet>,
    pub ports: Vec<u16>,
    /// Empty: the connection's original destination.
    pub endpoints: Vec<SocketAddr>,
    /// Without `endpoints`: the port the original destination is dialled on instead of its own
    /// (ServiceEntry's `targetPort`, e.g. 80 -> 443 with `tls`).
    pub target_port: Option<u16>,
    /// TLS the proxy originates to the endpoints (DestinationRule's `trafficPolicy.tls`).
    pub tls: Option<ServiceTls>,
    /// For the `destination_*` metric labels; `unknown` when absent.
    pub workload: Option<String>,
    pub app: Option<String>,
    pub version: Option<String>,
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    pub outlier_detection: OutlierDetection,
    pub retry_budget: RetryBudget,
}

impl ServiceConfig {
    /// A service with defaults for a destination nothing in the config names.
    /// The passthrough service, shared: requests to no declared service are most of a
    /// plain proxy's requests, and each used to build its own.
    pub fn shared_passthrough() -> Arc<ServiceConfig> {
        static PASSTHROUGH: LazyLock<Arc<ServiceConfig>> =
            LazyLock::new(|| Arc::new(ServiceConfig::passthrough()));
        PASSTHROUGH.clone()
    }

    pub fn passthrough() -> Self {
        ServiceConfig {
            name: "unknown".into(),
            namespace: "unknown".into(),
            hosts: Vec::new(),
            addresses: Vec::new(),
            ports: Vec::new(),
            endpoints: Vec::new(),
            target_port: None,
            tls: None,
            workload: None,
            app: None,
            version: None,
            load_balancer: LoadBalancer::default(),
            connection_pool: ConnectionPool::default(),
            outlier_detection: OutlierDetection::default(),
            retry_budget: RetryBudget::default(),
        }
    }

    pub fn matches_address(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        (self.ports.is_empty() || self.ports.contains(&addr.port()))
            && self.addresses.iter().any(|net| net.contains(&ip))
    }

    /// Where a service without `endpoints` sends a request made to `orig_dst`.
    pub fn endpoint_for(&self, orig_dst: SocketAddr) -> SocketAddr {
        match self.target_port {
            Some(port) => SocketAddr::new(orig_dst.ip(), port),
            None => orig_dst,
        }
    }
}

/// TLS originated to a service's endpoints, as Istio's DestinationRule `trafficPolicy.tls`:
/// the app speaks plaintext HTTP, the request leaves as HTTPS and the server is verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTls {
    pub mode: TlsMode,
    /// Sent as SNI and verified in the server's certificate (default: the service's first
    /// host); `None`: the endpoint's IP address is verified and no SNI is sent.
    pub sni: Option<String>,
    /// PEM roots the server's chain must lead to; `None`: the system's roots.
    pub ca_certificates: Option<PathBuf>,
    /// MUTUAL: the PEM chain we present, leaf first, and its key.
    pub client_certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
}

impl ServiceTls {
    /// The files it names (to read and to watch).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        [
            &self.ca_certificates,
            &self.client_certificate,
            &self.private_key,
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
    }

    /// Relative paths are taken from `base`, the mesh config's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.ca_certificates,
            &mut self.client_certificate,
            &mut self.private_key,
        ]
        .into_iter()
        .flatten()
        {
            *path = base.join(&*path);
        }
    }
}

/// Istio's `ClientTLSSettings.mode`, those that originate TLS to a server outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Verify the server.
    Simple,
    /// Verify the server and present a client certificate.
    Mutual,
}

/// Circuit breaking and pooling, per service (all endpoints together).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConnectionPool {
    /// Open upstream connections; beyond, requests wait (pending) for one.
    pub max_connections: usize,
    /// Requests waiting for a connection; beyond, 503 with flag UO.
    pub max_pending_requests: usize,
    /// Then the connection is closed and a new one opened; absent: unlimited.
    pub max_requests_per_connection: Option<u32>,
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
    /// Whether the app's HTTP/1.1 requests to a peer sidecar ride its shared HTTP/2
    /// connection (Istio's `h2UpgradePolicy`).
    pub h2_upgrade_policy: H2UpgradePolicy,
}

const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_MAX_PENDING_REQUESTS: usize = 1024;

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
            max_requests_per_connection: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            h2_upgrade_policy: H2UpgradePolicy::default(),
        }
    }
}

/// Istio's `connectionPool.http.h2UpgradePolicy`, between sidecars only: HTTP/1.1 requests to
/// a peer over mesh mTLS are multiplexed on one HTTP/2 connection to it, and the peer's sidecar
/// gives them to its app as HTTP/1.1 (as Linkerd does). Requests to anything else always keep
/// their protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// Upgrade, unless the service limits its connections (see [`ConnectionPool::carries_http1`]).
    #[default]
    Default,
    Upgrade,
    /// One HTTP/1 connection per request in flight, as the app's own (header case kept).
    DoNotUpgrade,
}

impl ConnectionPool {
    /// Whether HTTP/1.1 requests to the service's peer sidecars ride HTTP/2. By default, yes
    /// (both ends are this proxy; Istio's default is not to), unless the service sets a limit
    /// that counts HTTP/1 connections (`maxConnections`, `maxPendingRequests`,
    /// `maxRequestsPerConnection`): those keep their meaning, as in Istio's circuit-breaking
    /// recipe, unless `UPGRADE` says otherwise.
    pub fn carries_http1(&self) -> bool {
        match self.h2_upgrade_policy {
            H2UpgradePolicy::Upgrade => true,
            H2UpgradePolicy::DoNotUpgrade => false,
            H2UpgradePolicy::Default => {
                self.max_connections == DEFAULT_MAX_CONNECTIONS
                    && self.max_pending_requests == DEFAULT_MAX_PENDING_REQUESTS
                    && self.max_requests_per_connection.is_none()
            }
        }
    }
}

/// Ejection of an endpoint after consecutive failures (5xx answers or failed connects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    #[serde(with = "human_duration")]
    pub ejection_time: Duration,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
        }
    }
}

/// Retries in flight may be at most `percent` of the requests in flight, or `minRetries`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_retries: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20.0,
            min_retries: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRoute", rename_all = "camelCase")]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    pub destinations: Vec<WeightedDestination>,
    #[serde(with = "optional_human_duration")]
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub rate_limit: Option<RateLimit>,
    pub fault: Option<Fault>,
}

/// A local rate limit of a route (Envoy's local rate limit): a bucket of `burst` tokens,
/// refilled at `requestsPerSecond`; a request finding it empty gets 429 (flag `RL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRateLimit", rename_all = "camelCase")]
pub struct RateLimit {
    pub requests_per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRateLimit {
    requests_per_second: u32,
    burst: Option<u32>,
}

impl TryFrom<RawRateLimit> for RateLimit {
    type Error = String;

    fn try_from(raw: RawRateLimit) -> Result<Self, String> {
        let requests_per_second = NonZeroU32::new(raw.requests_per_second)
            .ok_or("`rateLimit.requestsPerSecond` must be above 0")?;
        let burst = match raw.burst {
            None => requests_per_second,
            Some(burst) => NonZeroU32::new(burst).ok_or("`rateLimit.burst` must be above 0")?,
        };
        Ok(RateLimit {
            requests_per_second,
            burst,
        })
    }
}

/// Faults injected into a route's requests, as Istio's VirtualService `fault`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// Held for `fixedDelay` before going upstream (flag `DI`).
    pub delay: Option<FaultDelay>,
    /// Answered by the proxy with `httpStatus`, never sent upstream (flag `FI`).
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub percentage: Percentage,
    #[serde(with = "human_duration")]
    pub fixed_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub percentage: Percentage,
    pub http_status: HttpStatus,
}

/// Istio's `percentage: {value: 12.5}`: the share of requests, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawPercentage")]
pub struct Percentage {
    pub value: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPercentage {
    value: f64,
}

impl TryFrom<RawPercentage> for Percentage {
    type Error = String;

    fn try_from(raw: RawPercentage) -> Result<Self, String> {
        if !(0.0..=100.0).contains(&raw.value) {
            return Err(format!("percentage {} is not between 0 and 100", raw.value));
        }
        Ok(Percentage { value: raw.value })
    }
}

/// An HTTP status a fault may answer with (200-599).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct HttpStatus(pub http::StatusCode);

impl From<HttpStatus> for u16 {
    fn from(status: HttpStatus) -> u16 {
        status.0.as_u16()
    }
}

impl TryFrom<u16> for HttpStatus {
    type Error = String;

    fn try_from(code: u16) -> Result<Self, String> {
        match http::StatusCode::from_u16(code) {
            Ok(status) if (200..600).contains(&code) => Ok(HttpStatus(status)),
            _ => Err(format!(
                "`httpStatus` {code} is not an HTTP status from 200 to 599"
            )),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// Authorities without port, any case; empty: any.
    #[serde(default)]
    pub hosts: Vec<Host>,
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawPathMatch", rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawHeaderMatch")]
pub struct HeaderMatch {
    /// Lowercase.
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ValueMatch {
    Present,
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Present => true,
            ValueMatch::Exact(expected) => value == expected,
            ValueMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            ValueMatch::Regex(pattern) => pattern.regex.is_match(value),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedDestination {
    pub service: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRetryPolicy", rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    #[serde(with = "optional_human_duration")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: BTreeSet<RetryOn>,
    /// POST and PATCH too (they may not be safe to repeat).
    pub retry_non_idempotent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    ServerError,
    /// The connection failed after the request was sent, before a response.
    Reset,
    ConnectFailure,
}

/// A regular expression, anchored to the whole value, shown as written.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        // Anchored: `/v1` must not match `/api/v1x` by accident.
        Regex::new(&format!("^(?:{source})$"))
            .map(|regex| Pattern { source, regex })
            .map_err(|error| serde::de::Error::custom(format!("invalid regex {error}")))
    }
}

/// A host name as it appears in an authority, compared without case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Host(pub String);

impl TryFrom<String> for Host {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let valid = !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '*'));
        if !valid {
            return Err(format!(
                "invalid host {text:?}: a DNS name without port (letters, digits, '.', '-')"
            ));
        }
        Ok(Host(text.to_ascii_lowercase()))
    }
}

/// An HTTP method, uppercase.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Method(pub http::Method);

impl TryFrom<String> for Method {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "invalid method {text:?}: expected e.g. GET or POST"
            ));
        }
        http::Method::from_bytes(text.as_bytes())
            .map(Method)
            .map_err(|error| format!("invalid method {text:?}: {error}"))
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHttpConfig {
    #[serde(default)]
    access_log: bool,
    #[serde(default)]
    ports: Vec<RawPortProtocol>,
    #[serde(default)]
    services: Vec<ServiceConfig>,
    #[serde(default)]
    routes: Vec<RouteConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPortProtocol {
    port: NonZeroU16,
    protocol: PortProtocol,
}

impl TryFrom<RawHttpConfig> for HttpConfig {
    type Error = String;

    fn try_from(raw: RawHttpConfig) -> Result<Self, String> {
        let mut ports = BTreeMap::new();
        for entry in raw.ports {
            if ports.insert(entry.port.get(), entry.protocol).is_some() {
                return Err(format!("http.ports: port {} is listed twice", entry.port));
            }
        }
        let mut names = BTreeSet::new();
        for service in &raw.services {
            if !names.insert(service.name.as_str()) {
                return Err(format!("service {:?} is defined twice", service.name));
            }
        }
        for route in &raw.routes {
            for destination in &route.destinations {
                if !names.contains(destination.service.as_str()) {
                    return Err(format!(
                        "route {:?}: destination service {:?} is not defined under `services`",
                        route.name, destination.service
                    ));
                }
            }
        }
        Ok(HttpConfig {
            access_log: raw.access_log,
            ports,
            services: raw.services,
            routes: raw.routes,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    hosts: Vec<Host>,
    #[serde(default)]
    addresses: Vec<Address>,
    #[serde(default)]
    ports: Vec<NonZeroU16>,
    #[serde(default)]
    endpoints: Vec<SocketAddr>,
    target_port: Option<NonZeroU16>,
    tls: Option<RawServiceTls>,
    workload: Option<String>,
    app: Option<String>,
    version: Option<String>,
    #[serde(default)]
    load_balancer: LoadBalancer,
    #[serde(default)]
    connection_pool: ConnectionPool,
    #[serde(default)]
    outlier_detection: OutlierDetection,
    #[serde(default)]
    retry_budget: RetryBudget,
}

impl TryFrom<RawService> for ServiceConfig {
    type Error = String;

    fn try_from(raw: RawService) -> Result<Self, String> {
        if raw.name.is_empty() {
            return Err("a service needs a non-empty `name`".into());
        }
        let pool = &raw.connection_pool;
        if pool.max_connections == 0 {
            return Err(format!(
                "service {}: connectionPool.maxConnections must be at least 1",
                raw.name
            ));
        }
        if pool.max_requests_per_connection == Some(0) {
            return Err(format!(
                "service {}: connectionPool.maxRequestsPerConnection must be at least 1",
                raw.name
            ));
        }
        if pool.idle_timeout.is_zero() {
            return Err(format!(
                "service {}: connectionPool.idleTimeout must be above zero",
                raw.name
            ));
        }
        if !(0.0..=100.0).contains(&raw.retry_budget.percent) {
            return Err(format!(
                "service {}: retryBudget.percent must be between 0 and 100",
                raw.name
            ));
        }
        if raw.outlier_detection.consecutive_failures == 0 {
            return Err(format!(
                "service {}: outlierDetection.consecutiveFailures must be at least 1",
                raw.name
            ));
        }
        if raw.target_port.is_some() && !raw.endpoints.is_empty() {
            return Err(format!(
                "service {}: `targetPort` rewrites the original destination's port; with `endpoints`, give each endpoint its port",
                raw.name
            ));
        }
        let tls = raw
            .tls
            .map(|tls| tls.validate(&raw.hosts))
            .transpose()
            .map_err(|error| format!("service {}: {error}", raw.name))?;
        Ok(ServiceConfig {
            namespace: raw.namespace.unwrap_or_else(|| "unknown".into()),
            hosts: raw.hosts.into_iter().map(|host| host.0).collect(),
            addresses: raw.addresses.into_iter().map(|a| a.0).collect(),
            ports: raw.ports.into_iter().map(NonZeroU16::get).collect(),
            endpoints: raw.endpoints,
            target_port: raw.target_port.map(NonZeroU16::get),
            tls,
            workload: raw.workload,
            app: raw.app,
            version: raw.version,
            load_balancer: raw.load_balancer,
            connection_pool: raw.connection_pool,
            outlier_detection: raw.outlier_detection,
            retry_budget: raw.retry_budget,
            name: raw.name,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServiceTls {
    mode: TlsMode,
    sni: Option<String>,
    ca_certificates: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
}

impl RawServiceTls {
    /// The client certificate goes with MUTUAL only; the server name defaults to the first of
    /// the service's `hosts`.
    fn validate(self, hosts: &[Host]) -> Result<ServiceTls, String> {
        let client = self.client_certificate.is_some() || self.private_key.is_some();
        match self.mode {
            TlsMode::Mutual if self.client_certificate.is_none() || self.private_key.is_none() => {
                return Err("`tls.mode: MUTUAL` needs `clientCertificate` and `privateKey`".into());
            }
            TlsMode::Simple if client => {
                return Err(
                    "`tls.clientCertificate` and `privateKey` go with `mode: MUTUAL`, not SIMPLE"
                        .into(),
                );
            }
            _ => {}
        }
        let sni = match self.sni {
            Some(sni) => {
                ServerName::try_from(sni.as_str())
                    .map_err(|_| format!("invalid `tls.sni` {sni:?}: a DNS name or an IP"))?;
                Some(sni)
            }
            None => match hosts.first() {
                Some(host) => {
                    ServerName::try_from(host.0.as_str()).map_err(|_| {
                        format!(
                            "the first host {:?} is not a server name to verify: give `tls.sni`",
                            host.0
                        )
                    })?;
                    Some(host.0.clone())
                }
                None => None,
            },
        };
        let empty =
            |path: &Option<PathBuf>| path.as_ref().is_some_and(|p| p.as_os_str().is_empty());
        if [
            &self.ca_certificates,
            &self.client_certificate,
            &self.private_key,
        ]
        .into_iter()
        .any(empty)
        {
            return Err("a `tls` file path is empty".into());
        }
        Ok(ServiceTls {
            mode: self.mode,
            sni,
            ca_certificates: self.ca_certificates,
            client_certificate: self.client_certificate,
            private_key: self.private_key,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(default, rename = "match")]
    matches: RouteMatch,
    destinations: Vec<WeightedDestination>,
    #[serde(default, with = "optional_human_duration")]
    timeout: Option<Duration>,
    retries: Option<RetryPolicy>,
    rate_limit: Option<RateLimit>,
    fault: Option<Fault>,
}

impl TryFrom<RawRoute> for RouteConfig {
    type Error = String;

    fn try_from(raw: RawRoute) -> Result<Self, String> {
        if raw.name.is_empty() {
            return Err("a route needs a non-empty `name`".into());
        }
        if raw
            .destinations
            .iter()
            .map(|d| u64::from(d.weight))
            .sum::<u64>()
            == 0
        {
            return Err(format!(
                "route {}: `destinations` needs at least one with a weight above 0",
                raw.name
            ));
        }
        if raw.timeout.is_some_and(|t| t.is_zero()) {
            return Err(format!("route {}: `timeout` must be above zero", raw.name));
        }
        Ok(RouteConfig {
            name: raw.name,
            matches: raw.matches,
            destinations: raw.destinations,
            timeout: raw.timeout,
            retries: raw.retries,
            rate_limit: raw.rate_limit,
            fault: raw.fault,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRetryPolicy {
    attempts: u32,
    #[serde(default, with = "optional_human_duration")]
    per_try_timeout: Option<Duration>,
    #[serde(default = "default_retry_on")]
    retry_on: BTreeSet<RetryOn>,
    #[serde(default)]
    retry_non_idempotent: bool,
}

fn default_retry_on() -> BTreeSet<RetryOn> {
    BTreeSet::from([
        RetryOn::ServerError,
        RetryOn::Reset,
        RetryOn::ConnectFailure,
    ])
}

impl TryFrom<RawRetryPolicy> for RetryPolicy {
    type Error = String;

    fn try_from(raw: RawRetryPolicy) -> Result<Self, String> {
        if raw.attempts == 0 {
            return Err("retries.attempts must be at least 1 (omit `retries` for none)".into());
        }
        if raw.per_try_timeout.is_some_and(|t| t.is_zero()) {
            return Err("retries.perTryTimeout must be above zero".into());
        }
        Ok(RetryPolicy {
            attempts: raw.attempts,
            per_try_timeout: raw.per_try_timeout,
            retry_on: raw.retry_on,
            retry_non_idempotent: raw.retry_non_idempotent,
        })
    }
}

/// `{exact: ...}`, `{prefix: ...}` or `{regex: ...}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPathMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<Pattern>,
}

impl TryFrom<RawPathMatch> for PathMatch {
    type Error = String;

    fn try_from(raw: RawPathMatch) -> Result<Self, String> {
        match (raw.exact, raw.prefix, raw.regex) {
            (Some(exact), None, None) => Ok(PathMatch::Exact(exact)),
            (None, Some(prefix), None) => Ok(PathMatch::Prefix(prefix)),
            (None, None, Some(regex)) => Ok(PathMatch::Regex(regex)),
            _ => Err("a path match needs exactly one of `exact`, `prefix`, `regex`".into()),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHeaderMatch {
    name: String,
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<Pattern>,
    present: Option<bool>,
}

impl TryFrom<RawHeaderMatch> for HeaderMatch {
    type Error = String;

    fn try_from(raw: RawHeaderMatch) -> Result<Self, String> {
        if http::HeaderName::from_bytes(raw.name.as_bytes()).is_err() {
            return Err(format!("invalid header name {:?}", raw.name));
        }
        let value = match (raw.exact, raw.prefix, raw.regex, raw.present) {
            (Some(exact), None, None, None) => ValueMatch::Exact(exact),
            (None, Some(prefix), None, None) => ValueMatch::Prefix(prefix),
            (None, None, Some(regex), None) => ValueMatch::Regex(regex),
            (None, None, None, Some(true)) => ValueMatch::Present,
            _ => {
                return Err(format!(
                    "header match {:?}: give exactly one of `exact`, `prefix`, `regex`, `present: true`",
                    raw.name
                ));
            }
        };
        Ok(HeaderMatch {
            name: raw.name.to_ascii_lowercase(),
            value,
        })
    }
}

/// Durations as humantime text (`30s`, `250ms`).
mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    /// protobuf's longest, so Envoy's: every duration is added to the present moment (a
    /// deadline, an ejection's end), which a longer one could overflow.
    const LONGEST: Duration = Duration::from_secs(315_576_000_000);

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({error}); e.g. 30s, 250ms"
            ))
        })?;
        if duration > LONGEST {
            return Err(serde::de::Error::custom(format!(
                "invalid duration {text:?}: longer than 10000 years"
            )));
        }
        Ok(duration)
    }
}

mod optional_human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => super::human_duration::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::human_duration")] Duration);
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|wrapped| wrapped.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_is_carried_by_default_unless_the_service_limits_its_connections() {
        let pool = |yaml: &str| serde_yaml::from_str::<ConnectionPool>(yaml).unwrap();
        assert!(pool("{}").carries_http1());
        assert!(pool("{h2UpgradePolicy: DEFAULT, idleTimeout: 5s}").carries_http1());
        for limited in [
            "{maxConnections: 1}",
            "{maxPendingRequests: 1}",
            "{maxRequestsPerConnection: 100}",
            "{h2UpgradePolicy: DO_NOT_UPGRADE}",
        ] {
            assert!(!pool(limited).carries_http1(), "{limited}");
        }
        assert!(pool("{maxConnections: 1, h2UpgradePolicy: UPGRADE}").carries_http1());
    }
}
