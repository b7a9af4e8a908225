//! The mesh as the data path sees it: the mesh config compiled together with this workload's
//! certificate, and the HTTP services' TLS origination, into ready-to-use TLS configs. Each
//! connection takes one snapshot, so a reload never changes a connection midway; new
//! connections get the new snapshot, and pooled connections made under a policy the new
//! snapshot no longer has are not reused.
//!
//! `reload` loads the config and its certificates and reloads them on change; `identity`:
//! SPIFFE IDs; `authz`: the allow rules of inbound ports; `config`: the YAML file.
pub mod authz;
pub mod config;
pub mod identity;
pub(crate) mod reload;

use std::{net::SocketAddr, sync::Arc};

use std::collections::BTreeMap;

use rustls::{ClientConfig, ServerConfig, crypto::CryptoProvider};
use tokio::sync::watch;

use super::{
    http::{HttpConfig, config::ServiceConfig, route_policy::RateLimiter, router::RouteTable},
    mesh::config::{InboundPolicy, MeshConfig, PortPolicy, Workload},
    mesh::identity::SpiffeId,
    tls::{
        self, TrustBundles, WorkloadCertificate,
        origination::{Originations, TlsOrigination},
        termination::Terminations,
    },
};

/// What connections to a mesh destination are made under. A pooled connection serves a new
/// request only while the snapshot in force says the same for its destination.
#[derive(Debug, PartialEq, Eq)]
pub struct MeshPolicy {
    /// The identities the server must prove, and its name in metrics.
    pub workload: Workload,
    /// Who we present.
    pub local: SpiffeId,
    /// The roots the server's chain was verified against.
    pub trust: Arc<TrustBundles>,
}

/// How an HTTP service's connections to an endpoint are made under a snapshot. A pooled
/// connection serves a request only while the snapshot in force says the same, so a TLS and a
/// plaintext connection to one address are never taken for each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSecurity {
    Plaintext,
    /// Mesh mTLS: the endpoint is a mesh workload.
    MeshMtls(Arc<MeshPolicy>),
    /// TLS originated for the service's `tls`.
    OriginatedTls(Arc<TlsOrigination>),
}

/// A mesh destination with the TLS config that checks its identity.
pub struct MeshDestination {
    pub policy: Arc<MeshPolicy>,
    pub client_config: Arc<ClientConfig>,
}

/// Mesh mTLS as this workload does it: who we are, how we answer, where we originate.
pub struct MeshTls {
    pub identity: SpiffeId,
    /// The inbound side's configs: mesh mTLS alone, or also taking carried HTTP/1.1.
    pub server_configs: tls::MeshServerConfigs,
    destinations: Vec<MeshDestination>,
}

impl MeshTls {
    /// The first mesh workload that `addr` belongs to, if any.
    pub fn destination(&self, addr: SocketAddr) -> Option<&MeshDestination> {
        self.destinations
            .iter()
            .find(|d| d.policy.workload.matches(addr))
    }
}

pub struct Mesh {
    inbound: InboundPolicy,
    tls: Option<MeshTls>,
    routes: Arc<RouteTable>,
    /// The TLS origination of the services of `routes` with `tls`.
    originations: Originations,
    /// The server TLS of the inbound ports with `tls`.
    terminations: Terminations,
    /// The token buckets of the inbound ports with `rateLimit`: a reload starts them afresh.
    inbound_limiters: BTreeMap<u16, Arc<RateLimiter>>,
}

impl Mesh {
    /// Without a mesh config: no destination is in the mesh, every inbound port is PERMISSIVE
    /// and mesh TLS is passed through to the app untouched.
    pub fn plaintext() -> Self {
        Self::plaintext_with_routes(HttpConfig::default())
    }

    /// Plaintext, with HTTP routing (a service with `tls` gets no connection: its TLS is not
    /// built here).
    pub fn plaintext_with_routes(http: HttpConfig) -> Self {
        Mesh {
            inbound: InboundPolicy::default(),
            tls: None,
            routes: Arc::new(RouteTable::new(http)),
            originations: Originations::default(),
            terminations: Terminations::default(),
            inbound_limiters: BTreeMap::new(),
        }
    }

    /// Without a certificate (a config without `identity`): plaintext, with the config's
    /// routes and inbound policy. `originations`: built from `config.http`; `terminations`:
    /// from `config.inbound`.
    pub fn build(
        config: &MeshConfig,
        cert: Option<&WorkloadCertificate>,
        originations: Originations,
        terminations: Terminations,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let routes = Arc::new(RouteTable::new(config.http.clone()));
        let inbound_limiters = config
            .inbound
            .ports
            .iter()
            .filter_map(|(port, policy)| {
                Some((*port, Arc::new(RateLimiter::new(policy.rate_limit?))))
            })
            .collect();
        let Some(cert) = cert else {
            return Ok(Mesh {
                inbound: config.inbound.clone(),
                tls: None,
                routes,
                originations,
                terminations,
                inbound_limiters,
            });
        };
        let destinations = config
            .workloads
            .iter()
            .map(|workload| {
                Ok(MeshDestination {
                    client_config: tls::client_config(
                        cert,
                        workload.identities.clone(),
                        provider,
                        config.session_resumption,
                    )?,
                    policy: Arc::new(MeshPolicy {
                        workload: workload.clone(),
                        local: cert.identity.clone(),
                        trust: cert.trust.clone(),
                    }),
                })
            })
            .collect::<Result<_, rustls::Error>>()?;
        Ok(Mesh {
            inbound: config.inbound.clone(),
            tls: Some(MeshTls {
                identity: cert.identity.clone(),
                server_configs: tls::server_configs(cert, provider, config.session_resumption)?,
                destinations,
            }),
            routes,
            originations,
            terminations,
            inbound_limiters,
        })
    }

    /// The server TLS of inbound `port`, if it has `tls`.
    pub fn server_tls(&self, port: u16) -> Option<&Arc<ServerConfig>> {
        self.terminations.get(port)
    }

    /// The token bucket of inbound `port`'s HTTP requests, if it has `rateLimit`.
    pub fn inbound_rate_limiter(&self, port: u16) -> Option<Arc<RateLimiter>> {
        self.inbound_limiters.get(&port).cloned()
    }

    pub fn inbound_policy(&self, port: u16) -> PortPolicy {
        self.inbound.port(port)
    }

    /// The HTTP routing table (empty without an `http` section).
    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes.clone()
    }

    /// `None` without a mesh config.
    pub fn tls(&self) -> Option<&MeshTls> {
        self.tls.as_ref()
    }

    /// The policy of connections to `addr`: `None` is plaintext.
    pub fn upstream_policy(&self, addr: SocketAddr) -> Option<&Arc<MeshPolicy>> {
        Some(&self.tls.as_ref()?.destination(addr)?.policy)
    }

    /// How `service` connects to its endpoint `addr`: its `tls` first (as Istio's
    /// DestinationRule TLS settings override mesh mTLS), else mTLS to a mesh workload, else
    /// plaintext. `None`: the service has `tls` that this snapshot did not build (a service of
    /// another snapshot), so no connection may be made or reused for it.
    pub fn upstream_security(
        &self,
        service: &ServiceConfig,
        addr: SocketAddr,
    ) -> Option<UpstreamSecurity> {
        if let Some(settings) = &service.tls {
            let origination = self.originations.get(settings)?;
            return Some(UpstreamSecurity::OriginatedTls(origination.clone()));
        }
        Some(match self.upstream_policy(addr) {
            Some(policy) => UpstreamSecurity::MeshMtls(policy.clone()),
            None => UpstreamSecurity::Plaintext,
        })
    }
}

/// The current snapshot, replaced whole by reloads, which subscribers are told about.
pub struct MeshHandle(watch::Sender<Arc<Mesh>>);

impl MeshHandle {
    pub fn new(mesh: Mesh) -> Self {
        MeshHandle(watch::Sender::new(Arc::new(mesh)))
    }

    pub fn current(&self) -> Arc<Mesh> {
        self.0.borrow().clone()
    }

    pub fn replace(&self, mesh: Mesh) {
        self.0.send_replace(Arc::new(mesh));
    }

    /// Sees each snapshot that replaces the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Mesh>> {
        self.0.subscribe()
    }
}
