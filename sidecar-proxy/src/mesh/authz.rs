//! Inbound authorization: allow rules by peer identity, per port.
use std::fmt;

use crate::mesh::identity::SpiffeId;

/// One way a peer can be allowed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// Exactly this identity.
    Principal(SpiffeId),
    /// Any service account of a namespace, in a trust domain.
    Namespace {
        trust_domain: String,
        namespace: String,
    },
    /// Any identity of a trust domain.
    TrustDomain(String),
}

impl AllowRule {
    fn allows(&self, peer: &SpiffeId) -> bool {
        match self {
            AllowRule::Principal(id) => id == peer,
            AllowRule::Namespace {
                trust_domain,
                namespace,
            } => peer.trust_domain() == trust_domain && peer.namespace() == namespace,
            AllowRule::TrustDomain(trust_domain) => peer.trust_domain() == trust_domain,
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowRule::Principal(id) => write!(f, "principal {id}"),
            AllowRule::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "namespace {namespace} of {trust_domain}"),
            AllowRule::TrustDomain(trust_domain) => write!(f, "trust domain {trust_domain}"),
        }
    }
}

/// Who may connect to one inbound port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Authorization {
    /// No rules for the port: every peer the inbound mode accepts is allowed.
    #[default]
    AllowAll,
    /// Only peers matching one of these rules (none: nobody). A plaintext peer has no
    /// identity, so it never matches.
    AllowOnly(Vec<AllowRule>),
}

/// Why a peer was denied, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    NoIdentity,
    NoRuleMatches(SpiffeId),
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::NoIdentity => {
                f.write_str("the port only allows listed identities and the peer is plaintext")
            }
            Denial::NoRuleMatches(id) => write!(f, "no allow rule of the port matches {id}"),
        }
    }
}

impl Authorization {
    pub fn check(&self, peer: Option<&SpiffeId>) -> Result<(), Denial> {
        let Authorization::AllowOnly(rules) = self else {
            return Ok(());
        };
        let peer = peer.ok_or(Denial::NoIdentity)?;
        if rules.iter().any(|rule| rule.allows(peer)) {
            Ok(())
        } else {
            Err(Denial::NoRuleMatches(peer.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> SpiffeId {
        text.parse().expect("valid SPIFFE ID")
    }

    #[test]
    fn each_rule_kind_matches_what_it_names() {
        let client = id("spiffe://cluster.local/ns/default/sa/client");
        let other_sa = id("spiffe://cluster.local/ns/default/sa/other");
        let other_ns = id("spiffe://cluster.local/ns/prod/sa/client");
        let other_td = id("spiffe://partner.example/ns/default/sa/client");

        let exact = AllowRule::Principal(client.clone());
        assert!(exact.allows(&client));
        assert!(!exact.allows(&other_sa));

        let namespace = AllowRule::Namespace {
            trust_domain: "cluster.local".into(),
            namespace: "default".into(),
        };
        assert!(namespace.allows(&client) && namespace.allows(&other_sa));
        assert!(!namespace.allows(&other_ns));
        assert!(
            !namespace.allows(&other_td),
            "same namespace name in another trust domain"
        );

        let domain = AllowRule::TrustDomain("cluster.local".into());
        assert!(domain.allows(&client) && domain.allows(&other_ns));
        assert!(!domain.allows(&other_td));
    }

    #[test]
    fn ports_without_rules_allow_everyone_and_empty_rules_nobody() {
        let client = id("spiffe://cluster.local/ns/default/sa/client");
        assert_eq!(Authorization::AllowAll.check(None), Ok(()));
        assert_eq!(Authorization::AllowAll.check(Some(&client)), Ok(()));

        let nobody = Authorization::AllowOnly(Vec::new());
        assert_eq!(
            nobody.check(Some(&client)),
            Err(Denial::NoRuleMatches(client.clone()))
        );

        let only_client = Authorization::AllowOnly(vec![AllowRule::Principal(client.clone())]);
        assert_eq!(only_client.check(Some(&client)), Ok(()));
        assert_eq!(only_client.check(None), Err(Denial::NoIdentity));
        let stranger = id("spiffe://cluster.local/ns/default/sa/stranger");
        assert_eq!(
            only_client.check(Some(&stranger)),
            Err(Denial::NoRuleMatches(stranger.clone()))
        );
    }
}
