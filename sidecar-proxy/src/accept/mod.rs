//! Taking connections in: the listeners and their accept loops (`listener`), each listener's
//! cap on open connections (`connection_limit`), and where an accepted connection was going
//! (`orig_dst`: SO_ORIGINAL_DST, the local address under sk_lookup, or fixed).
pub(crate) mod connection_limit;
pub(crate) mod listener;
pub(crate) mod orig_dst;
