//! The proxy's component tests: proxies on loopback ports with fixed original destinations (as
//! though redirected), no root, driven through the `testing` rig.
mod http_inbound;
mod http_outbound;
mod mesh;
mod server_tls;
mod tls_origination;
