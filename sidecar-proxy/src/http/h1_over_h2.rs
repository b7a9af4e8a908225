//! HTTP/1.1 requests carried between two sidecars on one HTTP/2 connection (Linkerd's
//! "protocol upgrade", Istio's `h2UpgradePolicy: UPGRADE`): the calling side multiplexes its
//! apps' HTTP/1.1 requests to a peer over the peer's shared mTLS HTTP/2 connection instead of
//! one connection (and one mTLS handshake) per request in flight, marking each with
//! [`ORIG_PROTO`]; the peer's sidecar takes the mark off and hands the request to its app as
//! the HTTP/1.1 request it was. The two sidecars agree on it in the mesh mTLS handshake (ALPN
//! `MESH_H2_ALPN`, which a peer without it, or a port declared `tcp`, does not choose: the
//! requests then keep HTTP/1). The mark is honoured only on such a connection (a peer sidecar
//! proved by its certificate) and never leaves a sidecar: apps cannot set it.
//!
//! What HTTP/2 cannot carry is lost on the way: the header names' case and a response's
//! custom reason phrase. A service whose app cares says `h2UpgradePolicy: DO_NOT_UPGRADE`.
use http::{
    HeaderName, HeaderValue, Method, Uri, Version,
    header::HOST,
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
};

use super::AppProtocol;

/// The marker of a carried request: the protocol the app sent it in.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("sidecar-orig-proto");
const HTTP_11: HeaderValue = HeaderValue::from_static("HTTP/1.1");

/// Can this request of the app's be carried over HTTP/2 and come out the same at the peer?
/// HTTP/1.1 in origin form with a `Host`; not `CONNECT` (a tunnel); upgrades (WebSocket)
/// never come here.
pub fn carriable(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.method != Method::CONNECT
        && parts.uri.authority().is_none()
        && parts.uri.path_and_query().is_some()
        && host_authority(parts).is_some()
}

fn host_authority(parts: &Parts) -> Option<Authority> {
    let host = parts.headers.get(HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

/// Turns a [`carriable`] request into its HTTP/2 form: the absolute URI HTTP/2 needs
/// (`:scheme`, `:authority` from `Host`, which is kept too), marked. One that is not carriable
/// is left as it is.
pub fn carry(parts: &mut Parts) {
    let (Some(authority), Some(path)) = (host_authority(parts), parts.uri.path_and_query()) else {
        return;
    };
    let absolute = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path.clone())
        .build();
    if let Ok(absolute) = absolute {
        parts.uri = absolute;
        parts.version = Version::HTTP_2;
        parts.headers.insert(ORIG_PROTO, HTTP_11);
    }
}

/// The request's protocol towards the app, the mark taken off: HTTP/1.1 (back in origin form)
/// for a request carried on a connection opened for it (`carrying`: mesh mTLS, agreed in its
/// handshake), else the protocol it arrived in. A mark anywhere else, or with another value,
/// is dropped and not honoured.
pub fn arrived_as(parts: &mut Parts, connection: AppProtocol, carrying: bool) -> AppProtocol {
    let Some(mark) = parts.headers.remove(ORIG_PROTO) else {
        return connection;
    };
    if connection != AppProtocol::Http2 || !carrying || mark != HTTP_11 {
        return connection;
    }
    uncarry(parts);
    AppProtocol::Http1
}

/// Back to the HTTP/1.1 request the app sent: origin form, unmarked, with its `Host` (kept on
/// the way, else the authority).
pub fn uncarry(parts: &mut Parts) {
    parts.headers.remove(ORIG_PROTO);
    parts.version = Version::HTTP_11;
    if !parts.headers.contains_key(HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(HOST, host);
    }
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn parts(method: &str, target: &str, version: Version, host: Option<&str>) -> Parts {
        let mut builder = Request::builder()
            .method(method)
            .uri(target)
            .version(version)
            .header("x-app", "kept");
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn get(target: &str) -> Parts {
        parts("GET", target, Version::HTTP_11, Some("reviews:9080"))
    }

    #[test]
    fn only_origin_form_http11_with_a_host_is_carried() {
        assert!(carriable(&get("/reviews/1?full=yes")));
        assert!(carriable(&parts("POST", "/", Version::HTTP_11, Some("a"))));
        let http10 = parts("GET", "/", Version::HTTP_10, Some("a"));
        let connect = parts("CONNECT", "a:443", Version::HTTP_11, Some("a:443"));
        let absolute = parts("GET", "http://a/", Version::HTTP_11, Some("a"));
        let no_host = parts("GET", "/", Version::HTTP_11, None);
        let bad_host = parts("GET", "/", Version::HTTP_11, Some("a b"));
        for kept in [http10, connect, absolute, no_host, bad_host] {
            assert!(!carriable(&kept), "{kept:?}");
        }
    }

    #[test]
    fn a_carried_request_reaches_the_app_as_the_app_sent_it() {
        let sent = get("/reviews/1?full=yes");
        let mut wire = sent.clone();
        carry(&mut wire);
        assert_eq!(wire.version, Version::HTTP_2);
        assert_eq!(wire.uri, "http://reviews:9080/reviews/1?full=yes");
        assert_eq!(wire.headers[ORIG_PROTO], "HTTP/1.1");

        let protocol = arrived_as(&mut wire, AppProtocol::Http2, true);
        assert_eq!(protocol, AppProtocol::Http1);
        assert_eq!(wire.version, sent.version);
        assert_eq!(wire.uri, sent.uri);
        assert_eq!(wire.method, sent.method);
        assert_eq!(wire.headers, sent.headers);
    }

    #[test]
    fn the_host_comes_from_the_authority_when_it_did_not_travel() {
        let mut wire = get("/");
        carry(&mut wire);
        wire.headers.remove(HOST);
        arrived_as(&mut wire, AppProtocol::Http2, true);
        assert_eq!(wire.headers[HOST], "reviews:9080");
        assert_eq!(wire.uri, "/");
    }

    #[test]
    fn a_mark_is_dropped_unhonoured_off_carrying_connections_or_with_another_value() {
        let marked = |value: &'static str| {
            let mut wire = get("/");
            carry(&mut wire);
            wire.headers
                .insert(ORIG_PROTO, HeaderValue::from_static(value));
            wire
        };
        let cases = [
            (marked("HTTP/1.1"), AppProtocol::Http2, false),
            (marked("HTTP/1.0"), AppProtocol::Http2, true),
            (marked("HTTP/1.1"), AppProtocol::Http1, true),
        ];
        for (mut wire, connection, carrying) in cases {
            let before = wire.uri.clone();
            let protocol = arrived_as(&mut wire, connection, carrying);
            assert_eq!(protocol, connection);
            assert!(!wire.headers.contains_key(ORIG_PROTO));
            assert_eq!(wire.uri, before, "left as it arrived");
        }
    }
}
