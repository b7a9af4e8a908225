//! Picks where a request goes: the first route whose match holds, a weighted destination of it;
//! else, for a host a route claims, no route (404 NR); else the service the authority or the
//! original destination belongs to; else the original destination itself (passthrough).
use std::{net::SocketAddr, sync::Arc};

use http::{HeaderMap, Method, header::HOST};

use super::{
    config::{HttpConfig, PathMatch, RouteConfig, RouteMatch, ServiceConfig},
    random::random_below,
    route_policy::RateLimiter,
};

/// Where one request goes.
pub enum Decision<'a> {
    Route {
        route: &'a RouteConfig,
        service: &'a Arc<ServiceConfig>,
        /// The route's local rate limit, when it has one.
        limiter: Option<&'a RateLimiter>,
    },
    /// No route: the service found by authority or address, with its defaults.
    Service(&'a Arc<ServiceConfig>),
    /// Nothing in the config is about this destination: the original destination, as TCP would.
    Passthrough,
    /// A route claims this host, but none matches the request.
    NoRoute,
}

/// What a request is matched on.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// Lowercase, without port.
    pub host: Option<String>,
    pub headers: &'a HeaderMap,
    pub orig_dst: SocketAddr,
}

impl<'a> RequestView<'a> {
    /// The authority of an HTTP/2 request is in its URI; an HTTP/1 one in `Host`.
    pub fn new(request: &'a http::Request<impl Sized>, orig_dst: SocketAddr) -> Self {
        let authority = request
            .uri()
            .authority()
            .map(|authority| authority.host().to_owned())
            .or_else(|| {
                let host = request.headers().get(HOST)?.to_str().ok()?;
                Some(strip_port(host).to_owned())
            });
        RequestView {
            method: request.method(),
            path: request.uri().path(),
            host: authority.map(|host| host.to_ascii_lowercase()),
            headers: request.headers(),
            orig_dst,
        }
    }
}

/// `host:port`, `[v6]:port` or `host` -> the host.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// The `http` section compiled for lookups; one per config snapshot.
pub struct RouteTable {
    config: HttpConfig,
    /// Index-aligned with `config.services`.
    services: Vec<Arc<ServiceConfig>>,
    /// Index-aligned with `config.routes`.
    limiters: Vec<Option<RateLimiter>>,
}

impl RouteTable {
    pub fn new(config: HttpConfig) -> Self {
        let services = config.services.iter().cloned().map(Arc::new).collect();
        let limiters = config
            .routes
            .iter()
            .map(|route| route.rate_limit.map(RateLimiter::new))
            .collect();
        RouteTable {
            config,
            services,
            limiters,
        }
    }

    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    fn service(&self, name: &str) -> Option<&Arc<ServiceConfig>> {
        self.services.iter().find(|service| service.name == name)
    }

    pub fn decide(&self, request: &RequestView<'_>) -> Decision<'_> {
        for (route, limiter) in self.config.routes.iter().zip(&self.limiters) {
            if route_matches(&route.matches, request)
                && let Some(service) = self.pick_destination(route)
            {
                return Decision::Route {
                    route,
                    service,
                    limiter: limiter.as_ref(),
                };
            }
        }
        let host = request.host.as_deref();
        let claimed = host.is_some_and(|host| {
            self.config
                .routes
                .iter()
                .any(|route| route.matches.hosts.iter().any(|h| host_matches(&h.0, host)))
        });
        if claimed {
            return Decision::NoRoute;
        }
        let by_host = host.and_then(|host| {
            self.services
                .iter()
                .find(|service| service.hosts.iter().any(|h| host_matches(h, host)))
        });
        let by_address = || {
            self.services
                .iter()
                .find(|service| service.matches_address(request.orig_dst))
        };
        match by_host.or_else(by_address) {
            Some(service) => Decision::Service(service),
            None => Decision::Passthrough,
        }
    }

    /// A destination drawn with probability weight / total weight.
    fn pick_destination(&self, route: &RouteConfig) -> Option<&Arc<ServiceConfig>> {
        let total: u64 = route.destinations.iter().map(|d| u64::from(d.weight)).sum();
        let mut draw = random_below(total);
        for destination in &route.destinations {
            let weight = u64::from(destination.weight);
            if draw < weight {
                return self.service(&destination.service);
            }
            draw -= weight;
        }
        None
    }
}

/// `*.example.com` matches any subdomain; anything else matches exactly.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern == host,
    }
}

fn route_matches(matches: &RouteMatch, request: &RequestView<'_>) -> bool {
    let host_ok = matches.hosts.is_empty()
        || request
            .host
            .as_deref()
            .is_some_and(|host| matches.hosts.iter().any(|h| host_matches(&h.0, host)));
    let path_ok = match &matches.path {
        None => true,
        Some(PathMatch::Exact(path)) => request.path == path,
        Some(PathMatch::Prefix(prefix)) => request.path.starts_with(prefix.as_str()),
        Some(PathMatch::Regex(pattern)) => pattern.is_match(request.path),
    };
    let method_ok = matches
        .method
        .as_ref()
        .is_none_or(|method| method.0 == *request.method);
    let headers_ok = matches.headers.iter().all(|header| {
        // Every value of a repeated header is a candidate.
        request
            .headers
            .get_all(header.name.as_str())
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| header.value.matches(value))
    });
    host_ok && path_ok && method_ok && headers_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> RouteTable {
        RouteTable::new(serde_yaml::from_str(yaml).expect("valid http section"))
    }

    const CONFIG: &str = "
services:
  - {name: v1, endpoints: ['127.0.0.1:1']}
  - {name: v2, endpoints: ['127.0.0.1:2']}
  - {name: vip, addresses: [10.96.0.10], ports: [80]}
routes:
  - name: canary-header
    match: {hosts: [reviews], headers: [{name: X-Canary, exact: 'yes'}]}
    destinations: [{service: v2}]
  - name: api
    match: {hosts: [reviews], path: {prefix: /api/}, method: GET}
    destinations: [{service: v2}]
  - name: versioned
    match: {hosts: [reviews], path: {regex: '/v[0-9]+'}}
    destinations: [{service: v2}]
  - name: exact
    match: {hosts: [reviews], path: {exact: /}}
    destinations: [{service: v1}]
";

    fn decide(table: &RouteTable, request: http::Request<()>) -> String {
        let orig_dst = "10.96.0.10:80".parse().expect("address");
        match table.decide(&RequestView::new(&request, orig_dst)) {
            Decision::Route { route, service, .. } => format!("{}->{}", route.name, service.name),
            Decision::Service(service) => format!("service {}", service.name),
            Decision::Passthrough => "passthrough".into(),
            Decision::NoRoute => "NR".into(),
        }
    }

    fn get(host: &str, path: &str) -> http::Request<()> {
        http::Request::get(path)
            .header(HOST, host)
            .body(())
            .expect("request")
    }

    #[test]
    fn matches_on_host_path_method_and_headers() {
        let table = table(CONFIG);
        assert_eq!(decide(&table, get("reviews:9080", "/")), "exact->v1");
        assert_eq!(decide(&table, get("Reviews", "/api/x")), "api->v2");
        let post = http::Request::post("/api/x")
            .header(HOST, "reviews")
            .body(())
            .expect("request");
        assert_eq!(decide(&table, post), "NR", "the api route is GET only");
        assert_eq!(decide(&table, get("reviews", "/v12")), "versioned->v2");
        assert_eq!(
            decide(&table, get("reviews", "/v12/x")),
            "NR",
            "regexes are anchored"
        );
        let canary = http::Request::get("/anything")
            .header(HOST, "reviews")
            .header("x-canary", "yes")
            .body(())
            .expect("request");
        assert_eq!(decide(&table, canary), "canary-header->v2");
        assert_eq!(decide(&table, get("other", "/")), "service vip");
    }

    #[test]
    fn unknown_destinations_pass_through() {
        let table = table("services: []\n");
        assert_eq!(decide(&table, get("anything", "/")), "passthrough");
    }

    #[test]
    fn weights_split_within_tolerance() {
        let table = table(
            "
services: [{name: a}, {name: b}]
routes:
  - name: split
    destinations: [{service: a, weight: 80}, {service: b, weight: 20}]
",
        );
        let draws = 20_000;
        let to_b = (0..draws)
            .filter(|_| decide(&table, get("x", "/")) == "split->b")
            .count();
        // Binomial: mean 4000, standard deviation ~57; 5 sigma is ~283.
        assert!(
            (3_700..=4_300).contains(&to_b),
            "{to_b} of {draws} went to b"
        );
    }
}
