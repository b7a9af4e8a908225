//! The proxy's component tests: proxies on loopback ports with fixed original destinations (as
//! though redirected), no root, driven through the `testing` rig.
// `cargo bolero` builds every test target of the package with coverage instrumentation; the
// fuzz engine linked through bolero provides its hooks (this crate has no fuzz target).
#[cfg(fuzzing)]
extern crate bolero;

mod http_inbound;
mod http_outbound;
mod mesh;
mod mesh_http2;
mod server_tls;
mod tls_origination;
