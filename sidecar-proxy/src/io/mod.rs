//! Moving a connection's bytes: dialling upstream (`upstream`, from the passthrough address to
//! the app), relaying or refusing (`relay`), zero-copy for plain TCP (`splice`: splice(2)
//! through pooled pipes) or counted copies (`copy`: TLS on either end), the idle and
//! request-headers deadlines of downstream connections (`deadlines`), TCP keepalive
//! (`keepalive`), an HTTP/2 connection's writes gathered into one per poll
//! (`gathered_writes`), and an HTTP/1 message's head and small body joined into one write
//! (`small_writes`).
pub(crate) mod copy;
pub(crate) mod deadlines;
pub(crate) mod gathered_writes;
pub(crate) mod keepalive;
pub(crate) mod relay;
pub(crate) mod small_writes;
pub(crate) mod splice;
pub(crate) mod upstream;
