//! The endpoints of one destination service: load balancing (round robin, or least request by
//! power of two random choices) over the endpoints not ejected, and ejection after consecutive
//! failures. Each endpoint carries its connection pool; the service its limits and retry budget.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use tokio::sync::{Notify, Semaphore};
use tracing::warn;

use super::{
    config::{LoadBalancer, ServiceConfig},
    metrics::HttpMetrics,
    pool::EndpointPool,
    random::random_below,
};
use crate::mesh::Mesh;

/// Past this many entries, states nobody uses any more are dropped (passthrough destinations
/// come and go with the app's traffic).
const SWEEP_THRESHOLD: usize = 1024;

/// A service's name, and the original destination for services without endpoints.
type ServiceKey = (String, Option<SocketAddr>);

/// Per-service state that outlives config snapshots: a reload that leaves a service's settings
/// unchanged keeps its pools and ejections.
#[derive(Default)]
pub struct Upstreams {
    services: Mutex<HashMap<ServiceKey, Arc<ServiceState>, foldhash::fast::RandomState>>,
}

impl Upstreams {
    /// The state of `config`, with `orig_dst` (at its `targetPort`) as its one endpoint when it
    /// lists none.
    pub fn service(&self, config: &Arc<ServiceConfig>, orig_dst: SocketAddr) -> Arc<ServiceState> {
        let key_dst = config.endpoints.is_empty().then_some(orig_dst);
        let key = (config.name.clone(), key_dst);
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = services.get(&key)
            && (Arc::ptr_eq(&state.config, config) || *state.config == **config)
        {
            return state.clone();
        }
        if services.len() >= SWEEP_THRESHOLD {
            services.retain(|_, state| Arc::strong_count(state) > 1 || state.has_connections());
        }
        let state = Arc::new(ServiceState::new(config.clone(), orig_dst));
        services.insert(key, state.clone());
        state
    }

    /// Closes the pooled connections that `mesh`, a reloaded snapshot, no longer makes as they
    /// were made: to a destination newly listed in `workloads`, removed from it, or changed;
    /// or with other TLS origination (the service's `tls` or its files changed).
    pub fn close_stale(&self, mesh: &Mesh) {
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        for state in services.values() {
            for endpoint in &state.endpoints {
                let current = mesh.upstream_security(&state.config, endpoint.addr);
                endpoint.pool.close_stale(current.as_ref());
            }
        }
    }
}

pub struct ServiceState {
    pub config: Arc<ServiceConfig>,
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    /// One permit per open upstream connection (circuit breaker: max connections).
    pub connection_permits: Arc<Semaphore>,
    /// Requests waiting for a connection (circuit breaker: max pending requests).
    pub pending: AtomicUsize,
    /// Signalled when a connection goes back to a pool.
    pub connection_returned: Notify,
    /// In flight, for the retry budget.
    pub active_requests: AtomicU64,
    pub active_retries: AtomicU64,
}

impl ServiceState {
    fn new(config: Arc<ServiceConfig>, orig_dst: SocketAddr) -> Self {
        let addrs = if config.endpoints.is_empty() {
            vec![config.endpoint_for(orig_dst)]
        } else {
            config.endpoints.clone()
        };
        ServiceState {
            endpoints: addrs.into_iter().map(Endpoint::new).collect(),
            next: AtomicUsize::new(0),
            connection_permits: Arc::new(Semaphore::new(config.connection_pool.max_connections)),
            pending: AtomicUsize::new(0),
            connection_returned: Notify::new(),
            active_requests: AtomicU64::new(0),
            active_retries: AtomicU64::new(0),
            config,
        }
    }

    fn has_connections(&self) -> bool {
        self.connection_permits.available_permits() < self.config.connection_pool.max_connections
    }

    /// An endpoint not ejected, by the service's policy; `None` when all are ejected.
    pub fn pick(&self, now: Instant) -> Option<&Endpoint> {
        let healthy: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|endpoint| !endpoint.is_ejected(now))
            .collect();
        match (healthy.len(), self.config.load_balancer) {
            (0, _) => None,
            (1, _) => Some(healthy[0]),
            (len, LoadBalancer::RoundRobin) => {
                Some(healthy[self.next.fetch_add(1, Ordering::Relaxed) % len])
            }
            (len, LoadBalancer::LeastRequest) => {
                let len = len as u64;
                let first = random_below(len);
                // A second, distinct choice.
                let second = (first + 1 + random_below(len - 1)) % len;
                let (a, b) = (healthy[first as usize], healthy[second as usize]);
                Some(
                    if b.active.load(Ordering::Relaxed) < a.active.load(Ordering::Relaxed) {
                        b
                    } else {
                        a
                    },
                )
            }
        }
    }

    /// May one more retry start? At most `percent` of the requests in flight, or `minRetries`.
    pub fn try_start_retry(&self) -> bool {
        let budget = &self.config.retry_budget;
        let active = self.active_requests.load(Ordering::Relaxed) as f64;
        let allowed = ((active * budget.percent / 100.0) as u64).max(u64::from(budget.min_retries));
        let started = self.active_retries.fetch_add(1, Ordering::Relaxed);
        if started >= allowed {
            self.active_retries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn finish_retry(&self) {
        self.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Requests in flight, for least-request balancing.
    pub active: AtomicU64,
    consecutive_failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
    pub pool: EndpointPool,
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            active: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            pool: EndpointPool::default(),
        }
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let until = self
            .ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|until| now < until)
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A 5xx answer or a failed connect; ejects the endpoint at the configured streak.
    pub fn record_failure(&self, service: &ServiceState, metrics: &HttpMetrics) {
        let outlier = &service.config.outlier_detection;
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures {
            return;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let until = Instant::now() + outlier.ejection_time;
        *self
            .ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(until);
        metrics.record_ejection(&service.config.name);
        warn!(
            service = service.config.name,
            endpoint = %self.addr,
            failures,
            ejection_time = ?outlier.ejection_time,
            "endpoint ejected after consecutive failures"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::http::config::OutlierDetection;

    fn service(balancer: LoadBalancer, endpoints: usize) -> ServiceState {
        let mut config = ServiceConfig::passthrough();
        config.load_balancer = balancer;
        config.endpoints = (1..=endpoints)
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port as u16)))
            .collect();
        config.outlier_detection = OutlierDetection {
            consecutive_failures: 2,
            ejection_time: Duration::from_secs(60),
        };
        ServiceState::new(Arc::new(config), SocketAddr::from(([127, 0, 0, 1], 9)))
    }

    #[test]
    fn round_robin_takes_turns_and_skips_ejected_endpoints() -> anyhow::Result<()> {
        let state = service(LoadBalancer::RoundRobin, 3);
        let metrics = HttpMetrics::register(&prometheus::Registry::new())?;
        let now = Instant::now();
        let ports: Vec<u16> = (0..6)
            .filter_map(|_| state.pick(now).map(|e| e.addr.port()))
            .collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3]);
        state.endpoints[1].record_failure(&state, &metrics);
        assert!(
            !state.endpoints[1].is_ejected(Instant::now()),
            "one failure"
        );
        state.endpoints[1].record_failure(&state, &metrics);
        let now = Instant::now();
        assert!((0..10).all(|_| state.pick(now).is_some_and(|e| e.addr.port() != 2)));
        for endpoint in [0, 2] {
            for _ in 0..2 {
                state.endpoints[endpoint].record_failure(&state, &metrics);
            }
        }
        assert!(state.pick(Instant::now()).is_none(), "none healthy: UH");
        Ok(())
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let state = service(LoadBalancer::LeastRequest, 2);
        state.endpoints[0].active.store(10, Ordering::Relaxed);
        let now = Instant::now();
        assert!((0..50).all(|_| state.pick(now).is_some_and(|e| e.addr.port() == 2)));
    }

    #[test]
    fn the_retry_budget_caps_concurrent_retries() {
        let state = service(LoadBalancer::RoundRobin, 1);
        // 20% of 0 in flight, but at least 3.
        assert!((0..3).all(|_| state.try_start_retry()));
        assert!(!state.try_start_retry());
        state.finish_retry();
        assert!(state.try_start_retry());
    }
}
