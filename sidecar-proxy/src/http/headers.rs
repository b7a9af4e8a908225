//! Header handling between hops: hop-by-hop headers removed (RFC 9110 7.6.1), except what an
//! upgrade needs; `x-request-id` and W3C `traceparent` generated when absent and propagated
//! as they are otherwise; `x-forwarded-for` appended with the client's address.
use std::net::IpAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{
        CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
        UPGRADE,
    },
};

use super::random::random_u64;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Is this an upgrade request or response (`Connection: upgrade` plus `Upgrade`)?
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_tokens(headers).any(|token| token == "upgrade")
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
}

/// Removes the headers that only concern one hop. An upgrade keeps `Connection: upgrade` and
/// `Upgrade`, which the next hop needs to switch protocols. `TE: trailers` stays (gRPC needs it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<String> = connection_tokens(headers)
        .filter(|token| !(upgrade && token == "upgrade"))
        .collect();
    for name in listed {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
    let te_trailers = headers
        .get(TE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TRAILER,
        TRANSFER_ENCODING,
        TE,
    ] {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
}

/// Adds the tracing and forwarding headers; returns the request id.
pub fn add_request_headers(headers: &mut HeaderMap, client: IpAddr) -> String {
    let request_id = ensure_request_id(headers)
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let valid_traceparent = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_valid_traceparent);
    if !valid_traceparent && let Ok(value) = HeaderValue::from_str(&new_traceparent()) {
        headers.insert(TRACEPARENT, value);
    }
    let forwarded = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {}", client.to_canonical()),
        None => client.to_canonical().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    request_id
}

/// The request's `x-request-id`, set to a new one (a UUID v4) when absent, empty or not text.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers
        .get(X_REQUEST_ID)
        .filter(|id| !id.is_empty() && id.to_str().is_ok())
    {
        return id.clone();
    }
    let id = HeaderValue::from_str(&new_request_id()).expect("hex digits and dashes");
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// A random UUID (version 4) as text.
fn new_request_id() -> String {
    let (high, low) = (random_u64(), random_u64());
    let high = (high & 0xffff_ffff_ffff_0fff) | 0x4000;
    let low = (low & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

/// Version 00, a random trace id and parent id, sampled.
fn new_traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-01",
        random_u64(),
        random_u64(),
        random_u64() | 1
    )
}

/// `00-<32 hex, not all zero>-<16 hex, not all zero>-<2 hex>`.
fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |part: &str| part.bytes().any(|b| b != b'0');
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_upgrades_keep_what_they_need() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers["x-app"], "kept");
        assert_eq!(headers[TE], "trailers");

        let mut upgrade = HeaderMap::new();
        upgrade.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        upgrade.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&upgrade));
        remove_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade[UPGRADE], "websocket");
        assert_eq!(upgrade[CONNECTION], "upgrade");
    }

    #[test]
    fn a_request_id_is_kept_or_set() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("from-the-client"));
        assert_eq!(ensure_request_id(&mut headers), "from-the-client");
        headers.insert(X_REQUEST_ID, HeaderValue::from_static(""));
        let id = ensure_request_id(&mut headers);
        assert_eq!(id.len(), 36);
        assert_eq!(headers[X_REQUEST_ID], id);
    }

    #[test]
    fn tracing_headers_are_generated_or_kept() {
        let mut headers = HeaderMap::new();
        let id = add_request_headers(&mut headers, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(id.len(), 36);
        assert_eq!(headers[X_REQUEST_ID], id.as_str());
        let traceparent = headers[TRACEPARENT].to_str().expect("ascii").to_owned();
        assert!(is_valid_traceparent(&traceparent), "{traceparent}");
        assert_eq!(headers[X_FORWARDED_FOR], "10.0.0.1");

        // A second hop keeps both ids and appends to the forwarding chain.
        let again = add_request_headers(&mut headers, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(again, id);
        assert_eq!(headers[TRACEPARENT], traceparent.as_str());
        assert_eq!(headers[X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2");
    }
}
