//! What a connection carries, told from its first bytes within bounds of time and size: a
//! mesh ClientHello (`client_hello`, inbound), HTTP/1 or HTTP/2 (`http`, both sides).
pub mod client_hello;
pub mod http;
