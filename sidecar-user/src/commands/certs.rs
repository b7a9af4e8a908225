//! `sidecar certs`: a lab CA and SPIFFE workload certificates (issued by
//! `sidecar_proxy::tls::issue`), for tests and demos.
//!
//! Every file is written to a temporary name and renamed into place, so a proxy watching the
//! directory never reads half a file.
use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rustix::fs::{Gid, Uid};
use sidecar_proxy::{
    mesh::identity::SpiffeId,
    tls::issue::{
        CA_CERT, CA_KEY, CERT_CHAIN, DEFAULT_CA_VALIDITY, DEFAULT_WORKLOAD_VALIDITY, Issued, KEY,
        ROOT_CERT, Validity, ca_trust_domain, issue_ca, issue_workload,
    },
};

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

/// The validity the flags give, `default` long from now without any.
fn validity_from_args(args: &ValidityArgs, default: Duration) -> Result<Validity> {
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

pub fn run(args: CertsArgs) -> Result<()> {
    match args.command {
        CertsCommand::Ca(args) => {
            let validity = validity_from_args(&args.validity, DEFAULT_CA_VALIDITY)?;
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
            let validity = validity_from_args(&args.validity, DEFAULT_WORKLOAD_VALIDITY)?;
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
    use time::OffsetDateTime;

    use super::*;

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
        assert!(validity_from_args(&backwards, DEFAULT_WORKLOAD_VALIDITY).is_err());
        let expired = Validity::expired();
        assert!(expired.not_after < OffsetDateTime::now_utc());
    }
}
