//! SPIFFE identities in Istio's form: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
use std::{fmt, str::FromStr};

use serde::Deserialize;
use thiserror::Error;

const SCHEME: &str = "spiffe://";

/// A workload identity, as carried in the URI SAN of its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("{0:?} is not a SPIFFE ID: it must start with `spiffe://`")]
    Scheme(String),
    #[error(
        "{0:?} is not an Istio-style SPIFFE ID: expected `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`"
    )]
    Shape(String),
    #[error(
        "invalid trust domain {0:?}: use lowercase letters, digits, `.`, `-` and `_` (at most 255)"
    )]
    TrustDomain(String),
    #[error("invalid {what} {value:?}: use letters, digits, `.`, `-` and `_` (not `.` or `..`)")]
    Segment { what: &'static str, value: String },
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_segment("namespace", namespace)?;
        validate_segment("service account", service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// The SPIFFE rules for a trust domain name (spiffe-id.md §2.1).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    let valid = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(trust_domain.to_owned()))
    }
}

/// The SPIFFE rules for a path segment (spiffe-id.md §2.2).
pub fn validate_segment(what: &'static str, segment: &str) -> Result<(), SpiffeIdError> {
    let valid = !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(SpiffeIdError::Segment {
            what,
            value: segment.to_owned(),
        })
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(text.to_owned()))?;
        let shape = || SpiffeIdError::Shape(text.to_owned());
        let (trust_domain, path) = rest.split_once('/').ok_or_else(shape)?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", namespace, "sa", service_account] => {
                SpiffeId::new(trust_domain, namespace, service_account)
            }
            _ => Err(shape()),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_ids_round_trip() -> Result<(), SpiffeIdError> {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/client".parse()?;
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account, "client");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "client")?);
        Ok(())
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_reason() {
        let error = |text: &str| text.parse::<SpiffeId>().unwrap_err();
        assert!(matches!(
            error("https://cluster.local/ns/a/sa/b"),
            SpiffeIdError::Scheme(_)
        ));
        for shape in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
        ] {
            assert!(matches!(error(shape), SpiffeIdError::Shape(_)), "{shape}");
        }
        assert!(matches!(
            error("spiffe://Cluster.Local/ns/a/sa/b"),
            SpiffeIdError::TrustDomain(_)
        ));
        assert!(matches!(
            error("spiffe:///ns/a/sa/b"),
            SpiffeIdError::TrustDomain(_)
        ));
        assert!(matches!(
            error("spiffe://td/ns/../sa/b"),
            SpiffeIdError::Segment { .. }
        ));
        assert!(matches!(
            error("spiffe://td/ns/a/sa/b%20c"),
            SpiffeIdError::Segment { .. }
        ));
        assert!(matches!(
            error("spiffe://td/ns//sa/b"),
            SpiffeIdError::Segment { .. }
        ));
    }
}
