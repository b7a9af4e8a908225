//! Loads the mesh config and the certificate files it names (this workload's, those of the
//! HTTP services' TLS origination and those of the inbound ports' server TLS), and reloads them when they change on disk (notify), without
//! a restart. A file that does not load is rejected with a log line and a counter, and what was
//! in force stays in force.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use rustls::crypto::CryptoProvider;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    mesh::config::{IdentityFiles, MeshConfig},
    mesh::{Mesh, MeshHandle},
    telemetry::metrics::{Metrics, ReloadKind},
    tls::{
        WorkloadCertificate,
        origination::{self, Originations, TlsFiles},
        rfc3339,
        termination::{self, Terminations},
    },
};

/// Writers replace several files in a row (certificate, then key): reload once they are done.
const SETTLE_TIME: Duration = Duration::from_millis(150);

/// What is in force, with the bytes it came from (to tell a real change from a touch).
struct Loaded {
    config_bytes: Vec<u8>,
    config: MeshConfig,
    certificate_bytes: Vec<Vec<u8>>,
    /// `None`: the config has no `identity` (plaintext, HTTP routing only).
    certificate: Option<WorkloadCertificate>,
    /// The files of the services' and the inbound ports' `tls`, and what was built from them.
    tls_files: TlsFiles,
    originations: Originations,
    terminations: Terminations,
}

pub struct MeshSource {
    config_path: PathBuf,
    provider: Arc<CryptoProvider>,
    metrics: Arc<Metrics>,
    handle: Arc<MeshHandle>,
    loaded: Loaded,
    /// The last config text rejected, so one bad edit is reported once, not at every event.
    rejected_config: Option<Vec<u8>>,
}

impl MeshSource {
    /// Loads everything once; at startup any problem is an error.
    pub fn load(
        config_path: &Path,
        provider: Arc<CryptoProvider>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let config_bytes = fs::read(config_path)
            .with_context(|| format!("cannot read the mesh config {}", config_path.display()))?;
        let config = MeshConfig::parse(&config_bytes, config_path)?;
        let (certificate_bytes, certificate) =
            load_certificate(&config, &provider).map_err(anyhow::Error::msg)?;
        let tls_files = read_tls_files(&config).map_err(anyhow::Error::msg)?;
        let originations =
            Originations::build(&config.http, &tls_files, &provider).map_err(anyhow::Error::msg)?;
        let terminations = Terminations::build(&config.inbound, &tls_files, &provider)
            .map_err(anyhow::Error::msg)?;
        let mesh = Mesh::build(
            &config,
            certificate.as_ref(),
            originations.clone(),
            terminations.clone(),
            &provider,
        )
        .context("cannot build the TLS configuration")?;
        if let Some(certificate) = &certificate {
            log_certificate("workload certificate loaded", certificate);
            metrics.set_certificate_expiration(certificate.not_after);
        }
        info!(
            path = %config_path.display(),
            trust_domain = config.trust_domain.as_deref().unwrap_or("none: plaintext"),
            workloads = config.workloads.len(),
            inbound_default_mode = %config.inbound.default_mode,
            "mesh config loaded"
        );
        Ok(MeshSource {
            config_path: config_path.to_owned(),
            provider,
            metrics,
            handle: Arc::new(MeshHandle::new(mesh)),
            loaded: Loaded {
                config_bytes,
                config,
                certificate_bytes,
                certificate,
                tls_files,
                originations,
                terminations,
            },
            rejected_config: None,
        })
    }

    pub fn handle(&self) -> Arc<MeshHandle> {
        self.handle.clone()
    }

    /// Re-reads the files and applies what changed, if it is valid.
    pub fn reload(&mut self) {
        let config_bytes = match fs::read(&self.config_path) {
            Ok(bytes) => bytes,
            Err(error) => {
                return self.reject(
                    ReloadKind::MeshConfig,
                    &format!("cannot read {}: {error}", self.config_path.display()),
                );
            }
        };
        let unchanged = config_bytes == self.loaded.config_bytes
            || self.rejected_config.as_ref() == Some(&config_bytes);
        let new_config = if unchanged {
            None
        } else {
            match MeshConfig::parse(&config_bytes, &self.config_path) {
                // Turning mTLS off must be deliberate: a restart, not a stray edit.
                Ok(config)
                    if config.identity.is_none() && self.loaded.config.identity.is_some() =>
                {
                    let error = format!(
                        "mesh config {}: `identity` was removed; turning mesh mTLS off needs a restart",
                        self.config_path.display()
                    );
                    self.reject(ReloadKind::MeshConfig, &error);
                    self.rejected_config = Some(config_bytes.clone());
                    None
                }
                Ok(config) => Some(config),
                Err(error) => {
                    // The certificates may still have changed: go on with the old config.
                    self.reject(ReloadKind::MeshConfig, &error.to_string());
                    self.rejected_config = Some(config_bytes.clone());
                    None
                }
            }
        };
        let config = new_config.as_ref().unwrap_or(&self.loaded.config);

        let (certificate_bytes, certificate) = match read_certificate_files(
            config.identity.as_ref(),
        ) {
            Ok(bytes) if bytes == self.loaded.certificate_bytes => {
                (bytes, self.loaded.certificate.clone())
            }
            _ => match load_certificate(config, &self.provider) {
                Ok(loaded) => loaded,
                Err(error) => {
                    if new_config.is_some() {
                        warn!(path = %self.config_path.display(),
                            "the new mesh config is not applied: its certificate files do not load");
                    }
                    return self.reject(ReloadKind::Certificates, &error);
                }
            },
        };
        let certificate_changed = certificate_bytes != self.loaded.certificate_bytes;

        let tls_files = match read_tls_files(config) {
            Ok(files) => files,
            Err(error) => return self.reject_tls_files(new_config.is_some(), &error),
        };
        let tls_files_changed = tls_files != self.loaded.tls_files;
        let (originations, terminations) = if new_config.is_none() && !tls_files_changed {
            (
                self.loaded.originations.clone(),
                self.loaded.terminations.clone(),
            )
        } else {
            let built = Originations::build(&config.http, &tls_files, &self.provider).and_then(
                |originations| {
                    let terminations =
                        Terminations::build(&config.inbound, &tls_files, &self.provider)?;
                    Ok((originations, terminations))
                },
            );
            match built {
                Ok(built) => built,
                Err(error) => return self.reject_tls_files(new_config.is_some(), &error),
            }
        };
        if new_config.is_none() && !certificate_changed && !tls_files_changed {
            return;
        }
        let mesh = match Mesh::build(
            config,
            certificate.as_ref(),
            originations.clone(),
            terminations.clone(),
            &self.provider,
        ) {
            Ok(mesh) => mesh,
            Err(error) => {
                return self.reject(
                    ReloadKind::Certificates,
                    &format!("cannot build the TLS configuration: {error}"),
                );
            }
        };
        self.handle.replace(mesh);
        if let Some(config) = new_config {
            self.metrics.record_reload(ReloadKind::MeshConfig, true);
            info!(
                path = %self.config_path.display(),
                workloads = config.workloads.len(),
                inbound_default_mode = %config.inbound.default_mode,
                "mesh config reloaded; new connections use it"
            );
            self.loaded.config = config;
            self.loaded.config_bytes = config_bytes;
            self.rejected_config = None;
        }
        if certificate_changed {
            if let Some(certificate) = &certificate {
                self.metrics.record_reload(ReloadKind::Certificates, true);
                self.metrics
                    .set_certificate_expiration(certificate.not_after);
                log_certificate(
                    "workload certificate reloaded; new connections use it",
                    certificate,
                );
            }
            self.loaded.certificate = certificate;
            self.loaded.certificate_bytes = certificate_bytes;
        }
        if tls_files_changed {
            self.metrics.record_reload(ReloadKind::Certificates, true);
            info!("TLS files (origination, inbound server TLS) reloaded; new connections use them");
            self.loaded.tls_files = tls_files;
        }
        self.loaded.originations = originations;
        self.loaded.terminations = terminations;
    }

    /// The files of a service's or an inbound port's `tls` do not load: the new config, if
    /// any, is not applied.
    fn reject_tls_files(&self, new_config: bool, error: &str) {
        if new_config {
            warn!(path = %self.config_path.display(),
                "the new mesh config is not applied: its TLS files do not load");
        }
        self.reject(ReloadKind::Certificates, error);
    }

    fn reject(&self, kind: ReloadKind, error: &str) {
        self.metrics.record_reload(kind, false);
        let what = match kind {
            ReloadKind::MeshConfig => "mesh config",
            ReloadKind::Certificates => "certificate files",
        };
        warn!(%error, "{what} rejected; the previous one stays in force");
    }

    /// The directories holding the files in force: watched rather than the files, because
    /// editors and Kubernetes replace files by renaming (a watch on the old inode goes quiet).
    fn directories(&self) -> BTreeSet<PathBuf> {
        std::iter::once(self.config_path.as_path())
            .chain(
                self.loaded
                    .config
                    .identity
                    .iter()
                    .flat_map(IdentityFiles::paths),
            )
            .chain(tls_paths(&self.loaded.config))
            .map(|path| match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect()
    }
}

/// Watches the files of `source` and reloads on change, on a task of the current runtime.
pub fn spawn_watcher(mut source: MeshSource) -> anyhow::Result<()> {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut watcher = RecommendedWatcher::new(
        move |event| {
            // Fails only once the task below is gone, i.e. at shutdown.
            let _ = events_tx.send(event);
        },
        notify::Config::default(),
    )
    .context("cannot watch the mesh config and certificate files")?;
    let mut watched = BTreeSet::new();
    update_watches(&mut watcher, &mut watched, source.directories())?;

    tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            match event {
                Ok(event) if is_change(&event.kind) => {}
                Ok(_) => continue,
                Err(error) => {
                    warn!(%error, "file watch error");
                    continue;
                }
            }
            // Let a burst of writes settle, then reload once.
            while let Ok(Some(_)) = tokio::time::timeout(SETTLE_TIME, events_rx.recv()).await {}
            source.reload();
            if let Err(error) = update_watches(&mut watcher, &mut watched, source.directories()) {
                warn!(error = %format!("{error:#}"), "cannot watch the new certificate directories");
            }
        }
    });
    Ok(())
}

/// Reads and opens do not change anything (and our own reads must not trigger reloads).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(access) => *access == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

fn update_watches(
    watcher: &mut RecommendedWatcher,
    watched: &mut BTreeSet<PathBuf>,
    wanted: BTreeSet<PathBuf>,
) -> anyhow::Result<()> {
    for gone in watched.difference(&wanted) {
        // The directory may have been deleted, which ends its watch anyway.
        let _ = watcher.unwatch(gone);
    }
    for dir in wanted.difference(watched) {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
        info!(dir = %dir.display(), "watching for mesh config and certificate changes");
    }
    *watched = wanted;
    Ok(())
}

/// The files of the services' TLS origination and of the inbound ports' server TLS.
fn tls_paths(config: &MeshConfig) -> BTreeSet<&Path> {
    let mut paths = origination::paths(&config.http);
    paths.extend(termination::paths(&config.inbound));
    paths
}

fn read_tls_files(config: &MeshConfig) -> Result<TlsFiles, String> {
    origination::read_files(tls_paths(config))
}

/// The certificate files' bytes; none without `identity`.
fn read_certificate_files(files: Option<&IdentityFiles>) -> Result<Vec<Vec<u8>>, String> {
    let Some(files) = files else {
        return Ok(Vec::new());
    };
    files
        .paths()
        .iter()
        .map(|path| {
            fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
        })
        .collect()
}

/// Reads and checks the certificate files `config` names, and that the certificate belongs to
/// the mesh's trust domain, whose roots are `trustBundle`.
fn load_certificate(
    config: &MeshConfig,
    provider: &CryptoProvider,
) -> Result<(Vec<Vec<u8>>, Option<WorkloadCertificate>), String> {
    let Some(files) = &config.identity else {
        return Ok((Vec::new(), None));
    };
    let trust_domain = config.trust_domain.as_deref().unwrap_or_default();
    let bytes = read_certificate_files(Some(files))?;
    // In the order of `IdentityFiles::paths`.
    let bundles = std::iter::once(trust_domain)
        .chain(files.federated_trust_bundles.keys().map(String::as_str))
        .zip(bytes[2..].iter().map(Vec::as_slice));
    let certificate = WorkloadCertificate::from_pem(&bytes[0], &bytes[1], bundles, provider)
        .map_err(|error| {
            let federated: String = files
                .federated_trust_bundles
                .iter()
                .map(|(domain, path)| format!(", {domain} trust bundle {}", path.display()))
                .collect();
            format!(
                "{error} (certificate chain {}, private key {}, trust bundle {}{federated})",
                files.certificate_chain.display(),
                files.private_key.display(),
                files.trust_bundle.display()
            )
        })?;
    if certificate.identity.trust_domain() != trust_domain {
        return Err(format!(
            "the certificate {} is for {}, outside the mesh's trust domain {trust_domain}",
            files.certificate_chain.display(),
            certificate.identity,
        ));
    }
    Ok((bytes, Some(certificate)))
}

fn log_certificate(message: &str, certificate: &WorkloadCertificate) {
    let not_after = rfc3339(certificate.not_after);
    let expired = certificate.not_after < OffsetDateTime::now_utc().unix_timestamp();
    if expired {
        warn!(identity = %certificate.identity, %not_after, "{message}, but it has EXPIRED: peers will refuse it");
    } else {
        info!(identity = %certificate.identity, %not_after, trust = %certificate.trust, "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::issue::issue_ca;
    use crate::{
        mesh::UpstreamSecurity,
        mesh::config::InboundMode,
        telemetry::metrics::LocalWorkload,
        testing::{Pki, metric, replace, valid, write_mesh_config},
        tls::server_pki::PartnerCa,
    };

    fn source(config: &Path) -> anyhow::Result<MeshSource> {
        let local = LocalWorkload {
            name: "w".into(),
            namespace: "ns".into(),
        };
        let metrics = Arc::new(Metrics::new(&local)?);
        MeshSource::load(config, crate::tls::crypto_provider(), metrics)
    }

    fn mode(source: &MeshSource) -> InboundMode {
        source.handle().current().inbound_policy(80).mode
    }

    fn identity(source: &MeshSource) -> String {
        source
            .handle()
            .current()
            .tls()
            .map(|tls| tls.identity.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_bad_config_is_rejected_once_and_the_old_one_stays() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let dir = pki.workload("w", "w", valid(), None)?;
        let config = write_mesh_config(&dir, "inbound: {mode: STRICT}\n")?;
        let mut source = source(&config)?;
        assert_eq!(mode(&source), InboundMode::Strict);

        replace(&config, "trustDomain: cluster.local\nidentity: 42\n")?;
        source.reload();
        source.reload(); // the same bad text is reported once
        assert_eq!(mode(&source), InboundMode::Strict);
        assert_eq!(
            source.metrics.reload_count(ReloadKind::MeshConfig, false),
            1
        );

        // Neither an empty file nor a config without `identity` turns mTLS off on a reload.
        for text in ["", "http: {accessLog: false}\n"] {
            replace(&config, text)?;
            source.reload();
            assert_eq!(mode(&source), InboundMode::Strict);
            assert!(source.handle().current().tls().is_some());
        }
        assert_eq!(
            source.metrics.reload_count(ReloadKind::MeshConfig, false),
            3
        );

        write_mesh_config(&dir, "inbound: {mode: PERMISSIVE}\n")?;
        source.reload();
        assert_eq!(mode(&source), InboundMode::Permissive);
        assert_eq!(source.metrics.reload_count(ReloadKind::MeshConfig, true), 1);
        source.reload(); // nothing changed: nothing counted
        assert_eq!(source.metrics.reload_count(ReloadKind::MeshConfig, true), 1);
        Ok(())
    }

    #[test]
    fn certificates_that_do_not_load_keep_the_old_ones() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let dir = pki.workload("w", "w", valid(), None)?;
        let config = write_mesh_config(&dir, "")?;
        let mut source = source(&config)?;
        let old_key = fs::read_to_string(dir.join("key.pem"))?;

        // A new certificate whose key has not arrived yet: a mismatch.
        pki.workload("w", "w2", valid(), None)?;
        replace(&dir.join("key.pem"), &old_key)?;
        source.reload();
        assert_eq!(identity(&source), Pki::id("w").to_string());
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, false),
            1
        );

        // Both in place: taken.
        pki.workload("w", "w2", valid(), None)?;
        source.reload();
        assert_eq!(identity(&source), Pki::id("w2").to_string());
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, true),
            1
        );
        assert!(
            metric(
                &source.metrics,
                "sidecar_certificate_expiration_seconds",
                &[]
            ) > 0
        );
        Ok(())
    }

    fn trust(source: &MeshSource) -> String {
        source
            .loaded
            .certificate
            .as_ref()
            .map(|certificate| certificate.trust.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn federated_trust_bundles_are_watched_and_a_bad_one_keeps_the_old() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let dir = pki.workload("w", "w", valid(), None)?;
        let partner_dir = dir.join("partner");
        fs::create_dir(&partner_dir)?;
        let partner_bundle = partner_dir.join("root.pem");
        let partner_ca = || issue_ca("partner.example", valid());
        replace(&partner_bundle, &partner_ca()?.cert_pem)?;
        let config = write_mesh_config(&dir, "")?;
        let text = fs::read_to_string(&config)?.replace(
            "  trustBundle: root-cert.pem\n",
            "  trustBundle: root-cert.pem\n  federatedTrustBundles:\n    partner.example: partner/root.pem\n",
        );
        replace(&config, &text)?;
        let mut source = source(&config)?;
        assert_eq!(
            trust(&source),
            "cluster.local (1 root), partner.example (1 root)"
        );
        assert!(
            source.directories().contains(&partner_dir),
            "the federated bundle's directory is watched"
        );

        replace(&partner_bundle, "not PEM")?;
        source.reload();
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, false),
            1
        );
        assert_eq!(
            trust(&source),
            "cluster.local (1 root), partner.example (1 root)",
            "the old bundles stay"
        );

        // A second partner root (their CA rotation): taken.
        let two_roots = format!("{}{}", partner_ca()?.cert_pem, partner_ca()?.cert_pem);
        replace(&partner_bundle, &two_roots)?;
        source.reload();
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, true),
            1
        );
        assert_eq!(
            trust(&source),
            "cluster.local (1 root), partner.example (2 roots)"
        );
        Ok(())
    }

    #[test]
    fn a_config_without_identity_routes_in_plaintext_and_reloads() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("mesh.yaml");
        replace(&config, "http:\n  services: [{name: a}]\n")?;
        let mut source = source(&config)?;
        let services =
            |source: &MeshSource| source.handle().current().routes().config().services.len();
        assert!(source.handle().current().tls().is_none());
        assert_eq!(services(&source), 1);

        replace(&config, "http:\n  services: [{name: a}, {name: a}]\n")?;
        source.reload();
        assert_eq!(services(&source), 1, "a service defined twice is rejected");
        assert_eq!(
            source.metrics.reload_count(ReloadKind::MeshConfig, false),
            1
        );

        replace(&config, "http:\n  services: [{name: a}, {name: b}]\n")?;
        source.reload();
        assert_eq!(services(&source), 2);
        assert_eq!(source.metrics.reload_count(ReloadKind::MeshConfig, true), 1);
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, true),
            0
        );
        Ok(())
    }

    #[test]
    fn tls_origination_files_are_watched_and_a_bad_one_keeps_the_old_config() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let partner_dir = dir.path().join("partner");
        fs::create_dir(&partner_dir)?;
        let ca_file = partner_dir.join("ca.pem");
        replace(&ca_file, PartnerCa::new("partner CA")?.cert_pem())?;
        let config = dir.path().join("mesh.yaml");
        let naming = |file: &str, host: &str| {
            format!(
                "http:\n  services: [{{name: partner, hosts: [{host}], tls: {{mode: SIMPLE, caCertificates: {file}}}}}]\n"
            )
        };
        replace(&config, &naming("partner/ca.pem", "api.partner"))?;
        let mut source = source(&config)?;
        assert!(
            source.directories().contains(&partner_dir),
            "the CA bundle's directory is watched"
        );
        let security = |source: &MeshSource| {
            let mesh = source.handle().current();
            let routes = mesh.routes();
            let service = &routes.config().services[0];
            let addr = "203.0.113.7:443".parse().expect("address");
            (service.hosts.clone(), mesh.upstream_security(service, addr))
        };
        let (hosts, in_force) = security(&source);
        assert!(
            matches!(in_force, Some(UpstreamSecurity::OriginatedTls(_))),
            "{in_force:?}"
        );

        // A config naming a file that is not there: not applied.
        replace(&config, &naming("partner/missing.pem", "new.partner"))?;
        source.reload();
        assert_eq!(security(&source), (hosts.clone(), in_force.clone()));
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, false),
            1
        );

        // The bundle in force turns to garbage: the old one stays.
        replace(&config, &naming("partner/ca.pem", "api.partner"))?;
        replace(&ca_file, "not PEM")?;
        source.reload();
        assert_eq!(security(&source), (hosts.clone(), in_force.clone()));
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, false),
            2
        );

        // A new bundle: taken, and connections made under the old one are not reused.
        replace(&ca_file, PartnerCa::new("next CA")?.cert_pem())?;
        source.reload();
        let (_, rotated) = security(&source);
        assert!(matches!(rotated, Some(UpstreamSecurity::OriginatedTls(_))));
        assert_ne!(rotated, in_force);
        assert_eq!(
            source.metrics.reload_count(ReloadKind::Certificates, true),
            1
        );

        // At startup, a missing file is an error naming it.
        replace(&config, &naming("partner/missing.pem", "api.partner"))?;
        let error = format!(
            "{:#}",
            self::source(&config).err().expect("a missing CA bundle")
        );
        assert!(
            error.contains("partner/missing.pem: No such file"),
            "{error}"
        );
        Ok(())
    }

    #[test]
    fn startup_fails_with_the_reason() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let dir = pki.workload("w", "w", valid(), None)?;
        let config = write_mesh_config(&dir, "inbound: {mode: LAX}\n")?;
        let error = source(&config).err().expect("bad mode").to_string();
        assert!(error.contains("mesh.yaml line 6 column 17"), "{error}");
        assert!(error.contains("unknown variant `LAX`"), "{error}");

        let config = dir.join("other-domain.yaml");
        replace(
            &config,
            "trustDomain: example.org\nidentity: {certificateChain: cert-chain.pem, privateKey: key.pem, trustBundle: root-cert.pem}\n",
        )?;
        let error = source(&config)
            .err()
            .expect("wrong trust domain")
            .to_string();
        assert!(
            error.contains("outside the mesh's trust domain example.org"),
            "{error}"
        );

        fs::remove_file(dir.join("key.pem"))?;
        let config = write_mesh_config(&dir, "")?;
        let error = source(&config).err().expect("no key").to_string();
        assert!(error.contains("key.pem"), "{error}");
        Ok(())
    }
}
