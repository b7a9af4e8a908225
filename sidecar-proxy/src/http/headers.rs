//! Header handling between hops: hop-by-hop headers removed (RFC 9110 7.6.1), except what an
//! upgrade needs; `x-request-id` and W3C `traceparent` generated when absent and propagated
//! as they are otherwise; `x-forwarded-for` appended with the client's address.
use std::net::IpAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE},
};

use super::{h1_over_h2::ORIG_PROTO, random::random_u64};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Is this an upgrade request or response (`Connection: upgrade` plus `Upgrade`)?
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && names_in_connection(headers, "upgrade")
}

/// Does a `Connection` header list `name` (case-insensitively)? Compared in place: this runs
/// on every request and response.
fn names_in_connection(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case(name))
}

/// The headers that only concern one hop, besides those `Connection` names; the mark of a
/// request carried between sidecars among them, so that no app can set it. Not `Trailer`: it
/// declares the trailer fields end to end (RFC 9110 6.6.2), and without it hyper sends none
/// on HTTP/1.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TRANSFER_ENCODING,
    TE,
    UPGRADE,
    ORIG_PROTO,
];

/// Removes the headers that only concern one hop. An upgrade keeps `Connection: upgrade` and
/// `Upgrade`, which the next hop needs to switch protocols. `TE: trailers` stays (gRPC needs it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the few names present, compared without allocating: this runs on every
    // request and response, and most carry none or only `Connection: keep-alive`.
    let listed = |name: &HeaderName| names_in_connection(headers, name.as_str());
    let kept_for_upgrade = |name: &HeaderName| upgrade && (*name == CONNECTION || *name == UPGRADE);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name) || listed(name))
        .filter(|name| !kept_for_upgrade(name))
        .cloned()
        .collect();
    if doomed.is_empty() && !upgrade {
        return;
    }
    let te_trailers = headers
        .get(TE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in doomed {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
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
    if let Some(traceparent) = headers.get_mut(TRACEPARENT) {
        never_indexed(traceparent);
    }
    request_id
}

/// Marks a value new with every request (an id): HTTP/2's header compression would add each to
/// its table and evict the repeated headers the table is for. HPACK's never-indexed literal.
fn never_indexed(value: &mut HeaderValue) {
    value.set_sensitive(true);
}

/// The request's `x-request-id`, set to a new one (a UUID v4) when absent, empty or not text.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers
        .get_mut(X_REQUEST_ID)
        .filter(|id| !id.is_empty() && id.to_str().is_ok())
    {
        never_indexed(id);
        return id.clone();
    }
    let mut id = HeaderValue::from_str(&new_request_id()).expect("hex digits and dashes");
    never_indexed(&mut id);
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// A random UUID (version 4) as text.
fn new_request_id() -> String {
    let (high, low) = (random_u64(), random_u64());
    let high = (high & 0xffff_ffff_ffff_0fff) | 0x4000;
    let low = (low & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let mut id = String::with_capacity(36);
    push_hex(&mut id, high >> 32, 8);
    id.push('-');
    push_hex(&mut id, high >> 16, 4);
    id.push('-');
    push_hex(&mut id, high, 4);
    id.push('-');
    push_hex(&mut id, low >> 48, 4);
    id.push('-');
    push_hex(&mut id, low, 12);
    id
}

/// Version 00, a random trace id and parent id, sampled.
fn new_traceparent() -> String {
    let mut value = String::with_capacity(55);
    value.push_str("00-");
    push_hex(&mut value, random_u64(), 16);
    push_hex(&mut value, random_u64(), 16);
    value.push('-');
    push_hex(&mut value, random_u64() | 1, 16);
    value.push_str("-01");
    value
}

/// The low `digits` hex digits of `value`, lower case, zero-padded (`format!("{:0N$x}")`
/// without the formatter: this runs twice per request).
fn push_hex(text: &mut String, value: u64, digits: u32) {
    for shift in (0..digits).rev() {
        let nibble = (value >> (shift * 4)) & 0xf;
        text.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
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
        headers.insert(
            http::header::TRAILER,
            HeaderValue::from_static("x-checksum"),
        );
        remove_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 3, "{headers:?}");
        assert_eq!(headers["x-app"], "kept");
        assert_eq!(headers[TE], "trailers");
        assert_eq!(headers[http::header::TRAILER], "x-checksum", "end to end");

        let mut upgrade = HeaderMap::new();
        upgrade.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        upgrade.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&upgrade));
        remove_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade[UPGRADE], "websocket");
        assert_eq!(upgrade[CONNECTION], "upgrade");
    }

    #[test]
    fn ids_are_zero_padded_lower_case_hex() {
        for value in [0, 0xa, 0xdead_beef, u64::MAX] {
            for digits in [4, 8, 12, 16] {
                let mut text = String::new();
                push_hex(&mut text, value, digits);
                let mask = if digits == 16 {
                    u64::MAX
                } else {
                    (1 << (digits * 4)) - 1
                };
                let expected = format!("{:0width$x}", value & mask, width = digits as usize);
                assert_eq!(text, expected);
            }
        }
        let id = new_request_id();
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!("89ab".contains(&id[19..20]), "RFC 4122 variant: {id}");
        assert!(is_valid_traceparent(&new_traceparent()));
    }

    #[test]
    fn an_upgrade_always_leaves_with_connection_upgrade_alone() {
        let mut upgrade = HeaderMap::new();
        upgrade.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        upgrade.insert(UPGRADE, HeaderValue::from_static("websocket"));
        remove_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade[CONNECTION], "upgrade");
        assert_eq!(upgrade[UPGRADE], "websocket");
    }

    #[test]
    fn hop_by_hop_headers_in_any_position_are_removed() {
        for name in HOP_BY_HOP {
            let mut headers = HeaderMap::new();
            headers.insert("x-app", HeaderValue::from_static("kept"));
            headers.insert(name.clone(), HeaderValue::from_static("x"));
            remove_hop_by_hop(&mut headers, false);
            assert_eq!(headers.len(), 1, "{name}: {headers:?}");
        }
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
        assert!(headers[X_REQUEST_ID].is_sensitive(), "never indexed");
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

    #[test]
    fn the_per_request_ids_are_kept_out_of_http2_header_compression() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("from-the-client"));
        add_request_headers(&mut headers, IpAddr::from([10, 0, 0, 1]));
        assert!(headers[X_REQUEST_ID].is_sensitive());
        assert!(headers[TRACEPARENT].is_sensitive());
        // The client's address repeats: compressed as before.
        assert!(!headers[X_FORWARDED_FOR].is_sensitive());
    }
}
