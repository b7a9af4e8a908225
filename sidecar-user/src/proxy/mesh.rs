//! The mesh as the data path sees it: the mesh config compiled together with this workload's
//! certificate into ready-to-use TLS configs. Each connection takes one snapshot, so a reload
//! never changes a connection midway; new connections get the new snapshot.
use std::{
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock},
};

use rustls::{ClientConfig, ServerConfig, crypto::CryptoProvider};

use super::{
    http::{HttpConfig, router::RouteTable},
    identity::SpiffeId,
    mesh_config::{InboundPolicy, MeshConfig, PortPolicy, Workload},
    tls::{self, WorkloadCertificate},
};

/// A mesh destination with the TLS config that checks its identity.
pub struct MeshDestination {
    pub workload: Workload,
    pub client_config: Arc<ClientConfig>,
}

/// Mesh mTLS as this workload does it: who we are, how we answer, where we originate.
pub struct MeshTls {
    pub identity: SpiffeId,
    pub server_config: Arc<ServerConfig>,
    destinations: Vec<MeshDestination>,
}

impl MeshTls {
    /// The first mesh workload that `addr` belongs to, if any.
    pub fn destination(&self, addr: SocketAddr) -> Option<&MeshDestination> {
        self.destinations.iter().find(|d| d.workload.matches(addr))
    }
}

pub struct Mesh {
    inbound: InboundPolicy,
    tls: Option<MeshTls>,
    routes: Arc<RouteTable>,
}

impl Mesh {
    /// Without a mesh config: no destination is in the mesh, every inbound port is PERMISSIVE
    /// and mesh TLS is passed through to the app untouched.
    pub fn plaintext() -> Self {
        Self::plaintext_with_routes(HttpConfig::default())
    }

    /// Plaintext, with HTTP routing.
    pub fn plaintext_with_routes(http: HttpConfig) -> Self {
        Mesh {
            inbound: InboundPolicy::default(),
            tls: None,
            routes: Arc::new(RouteTable::new(http)),
        }
    }

    /// Without a certificate (a config without `identity`): plaintext, with the config's
    /// routes and inbound policy.
    pub fn build(
        config: &MeshConfig,
        cert: Option<&WorkloadCertificate>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let routes = Arc::new(RouteTable::new(config.http.clone()));
        let Some(cert) = cert else {
            return Ok(Mesh {
                inbound: config.inbound.clone(),
                tls: None,
                routes,
            });
        };
        let destinations = config
            .workloads
            .iter()
            .map(|workload| {
                Ok(MeshDestination {
                    client_config: tls::client_config(cert, workload.identities.clone(), provider)?,
                    workload: workload.clone(),
                })
            })
            .collect::<Result<_, rustls::Error>>()?;
        Ok(Mesh {
            inbound: config.inbound.clone(),
            tls: Some(MeshTls {
                identity: cert.identity.clone(),
                server_config: tls::server_config(cert, provider)?,
                destinations,
            }),
            routes,
        })
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
}

/// The current snapshot, replaced whole by reloads.
pub struct MeshHandle(RwLock<Arc<Mesh>>);

impl MeshHandle {
    pub fn new(mesh: Mesh) -> Self {
        MeshHandle(RwLock::new(Arc::new(mesh)))
    }

    pub fn current(&self) -> Arc<Mesh> {
        // A panic while holding the lock cannot leave a half-written Arc behind.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, mesh: Mesh) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(mesh);
    }
}
