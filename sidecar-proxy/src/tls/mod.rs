//! Mesh mTLS with rustls: TLS 1.3 only, ring, SPIFFE identities, and an ALPN value that marks a
//! connection as mesh traffic (so a PERMISSIVE port can tell it from the app's own TLS).
//!
//! - `certs`: this workload's certificate, key and trust bundles;
//! - `issue`: issuing a lab CA and workload certificates (rcgen), for tests and `sidecar certs`;
//! - `trust`: the roots of each trust domain (ours and federated ones);
//! - `verify`: SPIFFE ID and chain checks on both sides, each chain against the roots of the
//!   trust domain its SPIFFE ID names;
//! - `origination`: TLS to servers outside the mesh for HTTP services with `tls` (webpki
//!   verification of the server's name, optionally a client certificate);
//! - `termination`: TLS for any client on inbound ports with `tls` (the port's own certificate,
//!   optionally a client certificate required).
mod certs;
pub mod issue;
pub mod origination;
#[cfg(any(test, feature = "testing"))]
pub mod server_pki;
pub mod termination;
mod trust;
mod verify;

use std::{io, sync::Arc};

use rustls::{
    CertificateError as RustlsCertError, ClientConfig, CommonState, ServerConfig,
    client::Resumption, crypto::CryptoProvider, sign::SingleCertAndKey, version::TLS13,
};

use self::verify::{IdentityError, SpiffeClientVerifier, SpiffeServerVerifier, TrustError};
pub use self::{
    certs::{WorkloadCertificate, rfc3339},
    trust::TrustBundles,
    verify::spiffe_id_of,
};
use super::{mesh::identity::SpiffeId, telemetry::metrics::FailureReason};

/// The ALPN protocol that marks sidecar-to-sidecar mTLS (Istio uses `istio-peer-exchange` and
/// friends for the same purpose).
pub const MESH_ALPN: &[u8] = b"sidecar-mesh/1";
/// Offered first, beside [`MESH_ALPN`], by a sidecar opening the HTTP/2 connection that carries
/// its apps' HTTP/1.1 requests (`http::h1_over_h2`); chosen by a peer's sidecar that serves them
/// on that port. A sidecar without it (an older version, or a port declared `tcp`) chooses
/// [`MESH_ALPN`], and the requests keep HTTP/1.
pub const MESH_H2_ALPN: &[u8] = b"sidecar-mesh-h2/1";

/// ring, its TLS 1.3 suites in the order BoringSSL (so Envoy and Istio) offers them on CPUs
/// with AES instructions: AES-128-GCM with SHA-256 first. ring's own default puts
/// AES-256-GCM with SHA-384 first, whose key schedule (HKDF) runs on SHA-512, which ring has
/// no hardware path for here: 8% of both sidecars' CPU on new mTLS connections, where
/// SHA-256 uses the CPU's SHA instructions.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Sessions a client config keeps for resumption (each destination has its own config).
const CLIENT_SESSIONS: usize = 64;

/// The inbound side's two configs: mesh mTLS alone, and mesh mTLS that also takes HTTP/1.1
/// requests carried over HTTP/2 ([`MESH_H2_ALPN`]).
pub struct MeshServerConfigs {
    pub mesh: Arc<ServerConfig>,
    pub carrying: Arc<ServerConfig>,
}

/// The inbound side: present our certificate, require and verify the peer's. With
/// `session_resumption`, clients get one TLS 1.3 ticket per handshake: a resumed handshake
/// proves the identity of the full one it came from (rustls keeps the client's certificate
/// chain in the ticket), and the tickets are sealed with a key of these configs alone (shared
/// by both), so a rotated certificate or trust bundle (new configs) turns every older ticket
/// into a full handshake.
pub fn server_configs(
    cert: &WorkloadCertificate,
    provider: &Arc<CryptoProvider>,
    session_resumption: bool,
) -> Result<MeshServerConfigs, rustls::Error> {
    let verifier = SpiffeClientVerifier::new(&cert.trust, provider.clone())
        .map_err(|error| rustls::Error::General(format!("client verifier: {error}")))?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key.clone())));
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    if session_resumption {
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        config.send_tls13_tickets = 1;
    } else {
        config.send_tls13_tickets = 0;
    }
    let mut carrying = config.clone();
    carrying.alpn_protocols = vec![MESH_H2_ALPN.to_vec(), MESH_ALPN.to_vec()];
    Ok(MeshServerConfigs {
        mesh: Arc::new(config),
        carrying: Arc::new(carrying),
    })
}

/// The outbound side towards one destination: present our certificate, and accept only a
/// server that chains to the trust bundle of its trust domain and is one of `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: Vec<SpiffeId>,
    provider: &Arc<CryptoProvider>,
    session_resumption: bool,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = SpiffeServerVerifier::new(cert.trust.clone(), expected, provider);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key.clone())));
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // A resumed session skips certificate verification. That is sound here because the
    // session cache belongs to this config, which exists for one set of expected identities,
    // trust bundles and certificate: a reload or a rotation builds a new config with an empty
    // cache, and a peer that rotated refuses the old ticket (see `server_configs`).
    config.resumption = if session_resumption {
        Resumption::in_memory_sessions(CLIENT_SESSIONS)
    } else {
        Resumption::disabled()
    };
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// `full` or `resumed`, for the handshake counter.
pub fn handshake_kind(connection: &CommonState) -> &'static str {
    match connection.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    }
}

/// The peer's SPIFFE ID after a completed handshake (already verified).
pub fn peer_identity(connection: &CommonState) -> Option<SpiffeId> {
    let leaf = connection.peer_certificates()?.first()?;
    spiffe_id_of(leaf).ok()
}

/// Why a handshake failed, for the failure counter.
pub fn failure_reason(error: &io::Error) -> FailureReason {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return FailureReason::TlsHandshakeFailed;
    };
    match tls {
        rustls::Error::InvalidCertificate(cert_error) => match cert_error {
            RustlsCertError::Expired | RustlsCertError::ExpiredContext { .. } => {
                FailureReason::PeerCertExpired
            }
            RustlsCertError::NotValidYet | RustlsCertError::NotValidYetContext { .. } => {
                FailureReason::PeerCertNotYetValid
            }
            // webpki's verdicts, for TLS origination (the mesh verifier says it in its own
            // words, below).
            RustlsCertError::UnknownIssuer | RustlsCertError::BadSignature => {
                FailureReason::PeerCertUnknownCa
            }
            RustlsCertError::NotValidForName | RustlsCertError::NotValidForNameContext { .. } => {
                FailureReason::PeerIdentityMismatch
            }
            RustlsCertError::Other(other) if other.0.downcast_ref::<TrustError>().is_some() => {
                FailureReason::PeerCertUnknownCa
            }
            RustlsCertError::Other(other) if other.0.downcast_ref::<IdentityError>().is_some() => {
                FailureReason::PeerIdentityMismatch
            }
            _ => FailureReason::TlsHandshakeFailed,
        },
        rustls::Error::AlertReceived(_) => FailureReason::TlsRejectedByPeer,
        _ => FailureReason::TlsHandshakeFailed,
    }
}

/// A handshake or relay error in words for the log: rustls prints some certificate errors
/// (our identity checks among them) only in their debug form.
pub fn describe(error: &io::Error) -> String {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return error.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(RustlsCertError::Other(other)) => {
            format!("invalid peer certificate: {}", other.0)
        }
        rustls::Error::AlertReceived(alert) => {
            format!("the peer refused the connection with the TLS alert {alert:?}")
        }
        other => other.to_string(),
    }
}

/// Whether a relay error is the peer sending a TLS alert: after a TLS 1.3 handshake the client
/// learns only at its first read that the server refused its certificate.
pub fn is_alert_from_peer(error: &io::Error) -> bool {
    failure_reason(error) == FailureReason::TlsRejectedByPeer
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use rustls::{CipherSuite, ClientConnection, ServerConnection, pki_types::ServerName};

    use super::{
        issue::{Validity, issue_ca, issue_workload},
        *,
    };

    const DOMAIN: &str = "cluster.local";

    #[test]
    fn mesh_handshakes_choose_aes_128_gcm_with_sha256() {
        let provider = crypto_provider();
        let validity = Validity::starting_now(Duration::from_secs(3600));
        let ca = issue_ca(DOMAIN, validity).expect("CA");
        let id = |sa: &str| SpiffeId::new(DOMAIN, "default", sa).expect("SPIFFE ID");
        let certificate = |sa: &str| {
            let issued = issue_workload(&ca, &id(sa), validity).expect("workload certificate");
            let bundle = [(DOMAIN, ca.cert_pem.as_bytes())];
            WorkloadCertificate::from_pem(
                issued.cert_pem.as_bytes(),
                issued.key_pem.as_bytes(),
                bundle,
                &provider,
            )
            .expect("loaded")
        };
        let server = server_configs(&certificate("server"), &provider, true).expect("server");
        let client = client_config(&certificate("client"), vec![id("server")], &provider, true)
            .expect("client");
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let mut client = ClientConnection::new(client, name).expect("client connection");
        let mut server = ServerConnection::new(server.mesh).expect("server connection");
        while client.is_handshaking() || server.is_handshaking() {
            let mut flight = Vec::new();
            client.write_tls(&mut flight).expect("client flight");
            server
                .read_tls(&mut flight.as_slice())
                .expect("to the server");
            server.process_new_packets().expect("server handshake");
            flight.clear();
            server.write_tls(&mut flight).expect("server flight");
            client
                .read_tls(&mut flight.as_slice())
                .expect("to the client");
            client.process_new_packets().expect("client handshake");
        }
        let suite = client.negotiated_cipher_suite().expect("negotiated");
        assert_eq!(suite.suite(), CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
