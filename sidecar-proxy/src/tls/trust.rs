//! Trust bundles bound to trust domains, as SPIFFE federation has them: each trust domain has
//! its own roots, and a peer's chain is verified only against the roots of the trust domain its
//! SPIFFE ID names. A CA trusted for a partner's domain thus cannot vouch for one of ours.
use std::{collections::BTreeMap, fmt, sync::Arc};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

/// The roots of every trusted trust domain.
#[derive(Clone)]
pub struct TrustBundles(BTreeMap<String, Arc<RootCertStore>>);

impl TrustBundles {
    /// One bundle per trust domain: PEM roots, at least one each.
    pub fn from_pem<'a>(
        bundles: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, String> {
        let mut parsed = BTreeMap::new();
        for (trust_domain, pem) in bundles {
            let mut roots = RootCertStore::empty();
            let certificates = certificates(pem)
                .map_err(|error| format!("trust bundle of {trust_domain}: {error}"))?;
            for (index, root) in certificates.into_iter().enumerate() {
                roots.add(root).map_err(|error| {
                    format!(
                        "trust bundle of {trust_domain}: certificate {} is not a usable root: {error}",
                        index + 1
                    )
                })?;
            }
            if parsed
                .insert(trust_domain.to_owned(), Arc::new(roots))
                .is_some()
            {
                return Err(format!("two trust bundles for {trust_domain}"));
            }
        }
        Ok(TrustBundles(parsed))
    }

    /// The roots that may issue identities of `trust_domain`; none for an unknown domain.
    pub fn roots(&self, trust_domain: &str) -> Option<&Arc<RootCertStore>> {
        self.0.get(trust_domain)
    }

    /// Every trust domain with its roots.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<RootCertStore>)> {
        self.0
            .iter()
            .map(|(domain, roots)| (domain.as_str(), roots))
    }
}

/// Equal when every trust domain has the same roots (what a reload compares).
impl PartialEq for TrustBundles {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .iter()
                .zip(other.iter())
                .all(|((a, a_roots), (b, b_roots))| a == b && a_roots.roots == b_roots.roots)
    }
}

impl Eq for TrustBundles {}

/// For logs: `cluster.local (1 root), partner.example (2 roots)`.
impl fmt::Display for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (domain, roots)) in self.iter().enumerate() {
            let count = roots.len();
            let plural = if count == 1 { "" } else { "s" };
            let separator = if index == 0 { "" } else { ", " };
            write!(f, "{separator}{domain} ({count} root{plural})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundles({self})")
    }
}

/// Every PEM certificate in `pem`, in order; at least one.
pub(super) fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("invalid PEM: {error}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::issue::{Validity, issue_ca};

    fn ca_pem(trust_domain: &str) -> String {
        issue_ca(
            trust_domain,
            Validity::starting_now(Duration::from_secs(3600)),
        )
        .expect("CA")
        .cert_pem
    }

    #[test]
    fn each_trust_domain_has_its_own_roots() -> Result<(), String> {
        let local = ca_pem("cluster.local");
        let partner = ca_pem("partner.example");
        let both = format!("{local}{partner}");
        let bundles = TrustBundles::from_pem([
            ("cluster.local", local.as_bytes()),
            ("partner.example", partner.as_bytes()),
        ])?;
        assert_eq!(bundles.roots("cluster.local").map(|r| r.len()), Some(1));
        assert_eq!(bundles.roots("partner.example").map(|r| r.len()), Some(1));
        assert!(bundles.roots("other.example").is_none());
        assert_eq!(
            bundles.to_string(),
            "cluster.local (1 root), partner.example (1 root)"
        );

        let again = TrustBundles::from_pem([
            ("cluster.local", local.as_bytes()),
            ("partner.example", partner.as_bytes()),
        ])?;
        assert_eq!(bundles, again);
        let rotated = TrustBundles::from_pem([
            ("cluster.local", both.as_bytes()),
            ("partner.example", partner.as_bytes()),
        ])?;
        assert_ne!(bundles, rotated, "a root added to one domain is a change");
        Ok(())
    }

    #[test]
    fn bad_bundles_are_reported_with_their_trust_domain() {
        let error = |bundles: &[(&str, &[u8])]| {
            TrustBundles::from_pem(bundles.iter().copied()).expect_err("rejected")
        };
        assert_eq!(
            error(&[("partner.example", b"")]),
            "trust bundle of partner.example: no PEM certificate found"
        );
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(
            error(&[("partner.example", garbage)])
                .starts_with("trust bundle of partner.example: certificate 1 is not a usable root")
        );
        let root = ca_pem("td");
        assert_eq!(
            error(&[("td", root.as_bytes()), ("td", root.as_bytes())]),
            "two trust bundles for td"
        );
    }
}
