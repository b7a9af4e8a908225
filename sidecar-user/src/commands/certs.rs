//! `sidecar certs`: a lab CA and SPIFFE workload certificates (rcgen), for tests and demos.
//!
//! Files use Istio's names: a CA directory holds `ca-cert.pem` and `ca-key.pem`; a workload
//! directory holds `cert-chain.pem`, `key.pem` and `root-cert.pem` (the trust bundle: the CA's
//! certificate). Every file is written to a temporary name and renamed into place, so a proxy
//! watching the directory never reads half a file.
use std::{
    fmt, fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustix::fs::{Gid, Uid};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::proxy::{
    identity::{SpiffeId, validate_trust_domain},
    tls::rfc3339,
};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const DEFAULT_WORKLOAD_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Backdating absorbs clock skew between the machine that issues and the peers that verify.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a CA: `ca-cert.pem` and `ca-key.pem` in `--out`.
    Ca(CaArgs),
    /// Issue a workload certificate for `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`:
    /// `cert-chain.pem`, `key.pem` and `root-cert.pem` in `--out`.
    Workload(WorkloadArgs),
}

#[derive(Args, Debug)]
struct CaArgs {
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Recorded in the CA certificate (URI SAN `spiffe://<trust-domain>`).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[command(flatten)]
    validity: ValidityArgs,
    #[command(flatten)]
    owner: OwnerArgs,
}

#[derive(Args, Debug)]
struct WorkloadArgs {
    /// Directory holding `ca-cert.pem` and `ca-key.pem`.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Kubernetes namespace of the workload.
    #[arg(long)]
    ns: String,
    /// Kubernetes service account of the workload.
    #[arg(long)]
    sa: String,
    /// Default: the trust domain recorded in the CA certificate.
    #[arg(long)]
    trust_domain: Option<String>,
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Trust bundle written as `root-cert.pem` (e.g. old and new CA during a rotation).
    /// Default: the issuing CA's certificate.
    #[arg(long, value_name = "PEM")]
    bundle: Option<PathBuf>,
    #[command(flatten)]
    validity: ValidityArgs,
    #[command(flatten)]
    owner: OwnerArgs,
}

#[derive(Args, Debug)]
struct ValidityArgs {
    /// Valid from now (backdated 5 minutes) for this long, e.g. `24h`, `90d`
    /// (default: 24h for a workload, 10 years for a CA).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["not_before", "not_after", "expired"])]
    valid_for: Option<Duration>,
    /// Start of validity, RFC 3339 (e.g. `2030-01-01T00:00:00Z` for a not-yet-valid one).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, requires = "not_after", conflicts_with = "expired")]
    not_before: Option<SystemTime>,
    /// End of validity, RFC 3339.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak, requires = "not_before", conflicts_with = "expired")]
    not_after: Option<SystemTime>,
    /// Already expired (valid from 2 hours ago to 1 hour ago), for tests.
    #[arg(long)]
    expired: bool,
}

#[derive(Args, Debug)]
struct OwnerArgs {
    /// Give the files to this user (and group), e.g. `1337:1337` for a proxy running as 1337.
    #[arg(long, value_name = "UID[:GID]", value_parser = parse_owner)]
    owner: Option<(u32, Option<u32>)>,
}

fn parse_owner(text: &str) -> Result<(u32, Option<u32>), String> {
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{text:?}: expected UID or UID:GID (numbers)"))
    };
    match text.split_once(':') {
        Some((uid, gid)) => Ok((number(uid)?, Some(number(gid)?))),
        None => Ok((number(text)?, None)),
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now (backdated against clock skew) for `duration`.
    pub fn starting_now(duration: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - BACKDATE,
            not_after: now + duration,
        }
    }

    /// Expired an hour ago.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::from_secs(2 * 3600),
            not_after: now - Duration::from_secs(3600),
        }
    }

    fn from_args(args: &ValidityArgs, default: Duration) -> Result<Self> {
        let validity = match (args.expired, args.not_before, args.not_after) {
            (true, _, _) => Validity::expired(),
            (false, Some(not_before), Some(not_after)) => Validity {
                not_before: not_before.into(),
                not_after: not_after.into(),
            },
            _ => Validity::starting_now(args.valid_for.unwrap_or(default)),
        };
        if validity.not_after <= validity.not_before {
            bail!("--not-after must be later than --not-before (got {validity})");
        }
        Ok(validity)
    }
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to {}",
            rfc3339(self.not_before.unix_timestamp()),
            rfc3339(self.not_after.unix_timestamp())
        )
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A self-signed CA for `trust_domain`, named uniquely so several can share a trust bundle.
pub fn issue_ca(trust_domain: &str, validity: Validity) -> Result<Issued> {
    validate_trust_domain(trust_domain)?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    let fingerprint: String = key.public_key_raw()[1..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = lab_name(&format!("sidecar lab CA {trust_domain} {fingerprint}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A workload certificate for `identity`, signed by `ca`, usable for both mTLS sides.
pub fn issue_workload(ca: &Issued, identity: &SpiffeId, validity: Validity) -> Result<Issued> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("cannot read the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).context("cannot read the CA certificate")?;
    let key = KeyPair::generate().context("cannot generate the workload key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = lab_name(&identity.to_string());
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the workload certificate")?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn lab_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "sidecar lab");
    name.push(DnType::CommonName, common_name);
    name
}

/// The trust domain a CA made by [`issue_ca`] records in its URI SAN.
fn ca_trust_domain(ca_cert_pem: &str) -> Result<String> {
    let der =
        CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).context("no PEM certificate")?;
    let (_, cert) = X509Certificate::from_der(&der).context("cannot parse the certificate")?;
    let san = cert
        .subject_alternative_name()
        .context("cannot parse the subject alternative names")?;
    san.into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix("spiffe://").map(str::to_owned),
            _ => None,
        })
        .context("the CA certificate records no trust domain (no `spiffe://` URI SAN); pass --trust-domain")
}

pub fn run(args: CertsArgs) -> Result<()> {
    match args.command {
        CertsCommand::Ca(args) => {
            let validity = Validity::from_args(&args.validity, DEFAULT_CA_VALIDITY)?;
            let ca = issue_ca(&args.trust_domain, validity)?;
            let owner = args.owner.owner;
            write_files(
                &args.out,
                &[(CA_CERT, &ca.cert_pem, 0o644), (CA_KEY, &ca.key_pem, 0o600)],
                owner,
            )?;
            println!(
                "CA for trust domain {} (valid {}) written to {}",
                args.trust_domain,
                validity,
                args.out.display()
            );
        }
        CertsCommand::Workload(args) => {
            let read = |name: &str| {
                let path = args.ca.join(name);
                fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
            };
            let ca = Issued {
                cert_pem: read(CA_CERT)?,
                key_pem: read(CA_KEY)?,
            };
            let trust_domain = match args.trust_domain {
                Some(trust_domain) => trust_domain,
                None => ca_trust_domain(&ca.cert_pem)
                    .with_context(|| format!("{}", args.ca.join(CA_CERT).display()))?,
            };
            let identity = SpiffeId::new(&trust_domain, &args.ns, &args.sa)?;
            let validity = Validity::from_args(&args.validity, DEFAULT_WORKLOAD_VALIDITY)?;
            let workload = issue_workload(&ca, &identity, validity)?;
            let bundle = match &args.bundle {
                Some(path) => fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => ca.cert_pem.clone(),
            };
            // The key first: a watcher that sees the new certificate finds its key in place.
            write_files(
                &args.out,
                &[
                    (KEY, &workload.key_pem, 0o600),
                    (CERT_CHAIN, &workload.cert_pem, 0o644),
                    (ROOT_CERT, &bundle, 0o644),
                ],
                args.owner.owner,
            )?;
            println!(
                "{identity} (valid {validity}) written to {}",
                args.out.display()
            );
        }
    }
    Ok(())
}

fn write_files(
    dir: &Path,
    files: &[(&str, &str, u32)],
    owner: Option<(u32, Option<u32>)>,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, contents, mode) in files {
        write_atomically(&dir.join(name), contents.as_bytes(), *mode, owner)?;
    }
    Ok(())
}

/// Write to a temporary sibling, then rename over `path`: readers see the old or the new file.
fn write_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, Option<u32>)>,
) -> Result<()> {
    let file_name = path
        .file_name()
        .context("a file path needs a file name")?
        .to_string_lossy();
    let temporary = path.with_file_name(format!(".{file_name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temporary)?;
        // The mode given at creation does not apply to an existing file.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(&file, Some(Uid::from_raw(uid)), gid.map(Gid::from_raw))?;
        }
        fs::rename(&temporary, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_certificate_carries_its_spiffe_id_and_validity() -> Result<()> {
        let ca = issue_ca("cluster.local", Validity::starting_now(DEFAULT_CA_VALIDITY))?;
        assert_eq!(ca_trust_domain(&ca.cert_pem)?, "cluster.local");
        let id = SpiffeId::new("cluster.local", "default", "client")?;
        let validity = Validity::starting_now(Duration::from_secs(3600));
        let workload = issue_workload(&ca, &id, validity)?;
        let der = CertificateDer::from_pem_slice(workload.cert_pem.as_bytes())?;
        assert_eq!(crate::proxy::tls::spiffe_id_of(&der)?, id);
        let (_, cert) = X509Certificate::from_der(&der)?;
        assert_eq!(
            cert.validity().not_after.timestamp(),
            validity.not_after.unix_timestamp()
        );
        Ok(())
    }

    #[test]
    fn two_cas_of_one_trust_domain_get_different_names() -> Result<()> {
        let subject = |ca: &Issued| -> Result<String> {
            let der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())?;
            let (_, cert) = X509Certificate::from_der(&der)?;
            Ok(cert.subject().to_string())
        };
        let validity = Validity::starting_now(DEFAULT_CA_VALIDITY);
        let (a, b) = (issue_ca("td", validity)?, issue_ca("td", validity)?);
        assert_ne!(subject(&a)?, subject(&b)?);
        Ok(())
    }

    #[test]
    fn files_are_replaced_atomically_with_their_mode() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key.pem");
        write_atomically(&path, b"one", 0o600, None)?;
        write_atomically(&path, b"two", 0o600, None)?;
        assert_eq!(fs::read(&path)?, b"two");
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::read_dir(dir.path())?.count(),
            1,
            "no temporary left behind"
        );
        Ok(())
    }

    #[test]
    fn owners_and_validity_flags_are_checked() {
        assert_eq!(parse_owner("1337"), Ok((1337, None)));
        assert_eq!(parse_owner("1337:1338"), Ok((1337, Some(1338))));
        assert!(parse_owner("proxy").is_err());
        let backwards = ValidityArgs {
            valid_for: None,
            not_before: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
            not_after: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000)),
            expired: false,
        };
        assert!(Validity::from_args(&backwards, DEFAULT_WORKLOAD_VALIDITY).is_err());
        let expired = Validity::expired();
        assert!(expired.not_after < OffsetDateTime::now_utc());
    }
}
