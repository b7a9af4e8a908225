//! `sidecar inject`: adds the capture init container and the proxy (a native sidecar) to
//! workload YAML, like `istioctl kube-inject`. Every document is transformed before anything
//! is written, so a refusal leaves no half-injected output behind.
use sidecar_common::DEFAULT_PROXY_ID;
use std::{
    io::{Read, Write},
    path::PathBuf,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::inject_probes;

/// Pod template annotation that marks a pod as injected (and makes injection idempotent).
pub const STATUS_ANNOTATION: &str = "sidecar.ebpf/status";
const STATUS_VALUE: &str = "injected";
pub const DEFAULT_IMAGE: &str = "localhost/sidecar:dev";
/// The proxy's container in the template.
const PROXY_CONTAINER: &str = "sidecar-proxy";

/// The init container and the proxy; `IMAGE`, `CERTS_SECRET` and `MESH_CONFIG_MAP` are
/// placeholders replaced by the command line's values (as whole YAML scalars, never spliced).
const TEMPLATE: &str = include_str!("inject_template.yaml");

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// Kubernetes YAML (one or several `---`-separated documents); `-` reads stdin.
    #[arg(default_value = "-")]
    pub input: PathBuf,
    /// Write the result here (replaced only once every document is injected) instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The image holding the `sidecar` binary, for both containers.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Secret with `cert-chain.pem`, `key.pem`, `root-cert.pem` (Istio's names).
    #[arg(long, default_value = "sidecar-certs")]
    pub certs_secret: String,
    /// ConfigMap with `mesh.yaml` (docs/MESH_CONFIG.md).
    #[arg(long, default_value = "sidecar-mesh-config")]
    pub mesh_config_map: String,
}

pub fn run(args: InjectArgs) -> Result<()> {
    let input = if args.input.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.input)
            .with_context(|| format!("cannot read {}", args.input.display()))?
    };
    let output = inject_stream(&input, &Injection::from_args(&args)?)?;
    match &args.output {
        None => std::io::stdout()
            .write_all(output.as_bytes())
            .context("cannot write stdout"),
        Some(path) => {
            // Written beside the target, then renamed over it: readers never see half a file.
            let staging = path.with_extension("sidecar-inject.tmp");
            std::fs::write(&staging, &output)
                .with_context(|| format!("cannot write {}", staging.display()))?;
            std::fs::rename(&staging, path)
                .with_context(|| format!("cannot replace {}", path.display()))
        }
    }
}

/// What is added to each pod: the containers and volumes, ready to insert.
pub struct Injection {
    init_containers: Vec<Value>,
    volumes: Vec<Value>,
}

impl Injection {
    fn from_args(args: &InjectArgs) -> Result<Injection> {
        Injection::new(&args.image, &args.certs_secret, &args.mesh_config_map)
    }

    pub fn new(image: &str, certs_secret: &str, mesh_config_map: &str) -> Result<Injection> {
        for (what, value) in [
            ("--image", image),
            ("--certs-secret", certs_secret),
            ("--mesh-config-map", mesh_config_map),
        ] {
            if value.trim().is_empty() || value.chars().any(char::is_whitespace) {
                bail!("invalid {what} {value:?}: it must be a non-empty name without spaces");
            }
        }
        let mut template: Value =
            serde_yaml::from_str(TEMPLATE).expect("the built-in injection template is YAML");
        replace_scalars(
            &mut template,
            &[
                ("IMAGE", image),
                ("CERTS_SECRET", certs_secret),
                ("MESH_CONFIG_MAP", mesh_config_map),
            ],
        );
        let take = |key: &str| match template.get(key) {
            Some(Value::Sequence(items)) => items.clone(),
            _ => unreachable!("the template has a {key} list"),
        };
        Ok(Injection {
            init_containers: take("initContainers"),
            volumes: take("volumes"),
        })
    }

    fn names(items: &[Value]) -> impl Iterator<Item = &str> {
        items.iter().filter_map(|item| item.get("name")?.as_str())
    }
}

fn replace_scalars(value: &mut Value, replacements: &[(&str, &str)]) {
    match value {
        Value::String(text) => {
            if let Some((_, new)) = replacements.iter().find(|(old, _)| old == text) {
                *text = new.to_string();
            }
        }
        Value::Sequence(items) => items
            .iter_mut()
            .for_each(|item| replace_scalars(item, replacements)),
        Value::Mapping(map) => map
            .values_mut()
            .for_each(|item| replace_scalars(item, replacements)),
        _ => {}
    }
}

/// Injects every document of a YAML stream; unknown kinds pass through unchanged.
pub fn inject_stream(input: &str, injection: &Injection) -> Result<String> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let mut value = Value::deserialize(document)
            .with_context(|| format!("document {}: not valid YAML", index + 1))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        inject_document(&mut value, injection)
            .with_context(|| format!("document {} ({})", index + 1, describe(&value)))?;
        documents.push(serde_yaml::to_string(&value).context("cannot write YAML")?);
    }
    Ok(documents.join("---\n"))
}

fn describe(document: &Value) -> String {
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(document, |value, key| value.get(key))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    format!("{} {}", field(&["kind"]), field(&["metadata", "name"]))
}

fn inject_document(document: &mut Value, injection: &Injection) -> Result<()> {
    let kind = document
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        "List" => {
            if let Some(Value::Sequence(items)) = document.get_mut("items") {
                for (index, item) in items.iter_mut().enumerate() {
                    inject_document(item, injection)
                        .with_context(|| format!("item {} ({})", index + 1, describe(item)))?;
                }
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let mut template = document;
    for key in template_path {
        template = template
            .get_mut(*key)
            .with_context(|| format!("{kind} without {}", template_path.join(".")))?;
    }
    inject_pod(template, injection)
}

/// Injects one pod (or pod template): `metadata` and `spec` of `pod`.
fn inject_pod(pod: &mut Value, injection: &Injection) -> Result<()> {
    let Value::Mapping(pod) = pod else {
        bail!("the pod template is not a mapping");
    };
    let annotations = pod
        .get("metadata")
        .and_then(|metadata| metadata.get("annotations"));
    if annotations
        .and_then(|annotations| annotations.get(STATUS_ANNOTATION))
        .is_some()
    {
        return Ok(()); // injected before: injecting again changes nothing
    }
    let rewrite_probes = annotations
        .and_then(|annotations| annotations.get(inject_probes::REWRITE_ANNOTATION))
        .and_then(Value::as_str)
        != Some("false");
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .context("the pod has no spec")?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        bail!(
            "cannot inject a hostNetwork pod: it shares the node's network namespace, so \
             capturing its traffic would capture the node's"
        );
    }
    if !matches!(spec.get("containers"), Some(Value::Sequence(c)) if !c.is_empty()) {
        bail!("the pod spec has no containers");
    }
    refuse_proxy_identity(spec)?;
    for (field, ours) in [
        ("containers", &injection.init_containers),
        ("initContainers", &injection.init_containers),
        ("volumes", &injection.volumes),
    ] {
        let existing = list(spec, field)?;
        if let Some(clash) = Injection::names(&existing)
            .find(|name| Injection::names(ours).collect::<Vec<_>>().contains(name))
        {
            bail!(
                "the pod already has {field} entry {clash:?} but no {STATUS_ANNOTATION} \
                 annotation: it was not added by `sidecar inject`; rename or remove it"
            );
        }
    }
    // Ours first: capture is in place and the proxy ready before the app's own init
    // containers run (they may dial out too).
    let probes = if rewrite_probes {
        inject_probes::rewrite(spec)?
    } else {
        None
    };
    let mut init_containers = injection.init_containers.clone();
    if let Some(probes) = &probes {
        give_proxy_the_probes(&mut init_containers, &probes.probers)?;
    }
    init_containers.extend(list(spec, "initContainers")?);
    spec.insert("initContainers".into(), Value::Sequence(init_containers));
    let mut volumes = list(spec, "volumes")?;
    volumes.extend(injection.volumes.iter().cloned());
    spec.insert("volumes".into(), Value::Sequence(volumes));

    let metadata = pod
        .entry("metadata".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let metadata = metadata
        .as_mapping_mut()
        .context("the pod's metadata is not a mapping")?;
    let annotations = metadata
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let annotations = annotations
        .as_mapping_mut()
        .context("the pod's annotations are not a mapping")?;
    annotations.insert(STATUS_ANNOTATION.into(), STATUS_VALUE.into());
    if let Some(probes) = probes {
        annotations.insert(
            inject_probes::ORIGINAL_PROBES_ANNOTATION.into(),
            probes.originals.into(),
        );
    }
    Ok(())
}

/// Sets the proxy container's `SIDECAR_APP_PROBERS`: the probes it performs for the kubelet.
fn give_proxy_the_probes(containers: &mut [Value], probers: &str) -> Result<()> {
    let proxy = containers
        .iter_mut()
        .find(|container| container.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
        .expect("the template has the proxy container");
    let env = proxy
        .as_mapping_mut()
        .context("the proxy container is not a mapping")?
        .entry("env".into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    let Value::Sequence(env) = env else {
        bail!("the proxy container's env is not a list");
    };
    let mut variable = Mapping::new();
    variable.insert("name".into(), inject_probes::APP_PROBERS_ENV.into());
    variable.insert("value".into(), probers.into());
    env.push(Value::Mapping(variable));
    Ok(())
}

/// Sockets of the proxy's UID or GID are never captured: a container of the app running as
/// either would bypass the mesh entirely (no mTLS, no policy), so such a pod is refused.
fn refuse_proxy_identity(spec: &Mapping) -> Result<()> {
    let id = |context: Option<&Value>, key: &str| {
        context
            .and_then(|context| context.get(key))
            .and_then(Value::as_u64)
    };
    let pod = spec.get("securityContext");
    for field in ["containers", "initContainers"] {
        for container in list(spec, field)? {
            let own = container.get("securityContext");
            let uid = id(own, "runAsUser").or(id(pod, "runAsUser"));
            let gid = id(own, "runAsGroup").or(id(pod, "runAsGroup"));
            let proxy = u64::from(DEFAULT_PROXY_ID);
            if uid == Some(proxy) || gid == Some(proxy) {
                let name = container
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("<unnamed>");
                bail!(
                    "container {name:?} runs as UID or GID {proxy}, the proxy's: its traffic \
                     would never be captured (no mTLS, no policy); run it as another user"
                );
            }
        }
    }
    Ok(())
}

/// A list field of the pod spec (absent or null: empty).
fn list(spec: &Mapping, field: &str) -> Result<Vec<Value>> {
    match spec.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(items)) => Ok(items.clone()),
        Some(_) => bail!("the pod's {field} is not a list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injection() -> Injection {
        Injection::new(DEFAULT_IMAGE, "sidecar-certs", "sidecar-mesh-config").unwrap()
    }

    fn inject(input: &str) -> Result<String> {
        inject_stream(input, &injection())
    }

    fn error(input: &str) -> String {
        format!("{:#}", inject(input).unwrap_err())
    }

    const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels:
    zeta: last
    alpha: first
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      initContainers:
      - name: migrate
        image: migrate:1
      containers:
      - name: app
        image: web:1
        ports:
        - containerPort: 8080
      volumes:
      - name: data
        emptyDir: {}
";

    fn pod_spec(output: &str) -> Value {
        let doc: Value = serde_yaml::from_str(output).unwrap();
        doc["spec"]["template"]["spec"].clone()
    }

    fn names(spec: &Value, field: &str) -> Vec<String> {
        Injection::names(spec[field].as_sequence().unwrap())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn adds_init_and_native_sidecar_before_the_apps_init_containers() {
        let output = inject(DEPLOYMENT).unwrap();
        let spec = pod_spec(&output);
        assert_eq!(
            names(&spec, "initContainers"),
            ["sidecar-init", "sidecar-proxy", "migrate"]
        );
        assert_eq!(names(&spec, "containers"), ["app"]);
        assert_eq!(
            names(&spec, "volumes"),
            [
                "data",
                "sidecar-certs",
                "sidecar-mesh-config",
                "sidecar-podinfo",
                "sidecar-host-cgroup",
                "sidecar-host-bpffs"
            ]
        );
        let host_paths: Vec<&Value> = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|volume| volume.get("hostPath"))
            .map(|host_path| &host_path["path"])
            .collect();
        assert_eq!(host_paths, ["/sys/fs/cgroup", "/sys/fs/bpf"]);
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
        assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(proxy["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(proxy["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15021);
        assert_eq!(proxy["image"], DEFAULT_IMAGE);
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
        assert_eq!(
            spec["initContainers"][0]["securityContext"]["privileged"],
            true
        );
        let doc: Value = serde_yaml::from_str(&output).unwrap();
        assert_eq!(
            doc["spec"]["template"]["metadata"]["annotations"][STATUS_ANNOTATION],
            "injected"
        );
    }

    #[test]
    fn leaves_unrelated_fields_and_their_order_alone() {
        let output = inject(DEPLOYMENT).unwrap();
        assert!(output.contains("labels:\n    zeta: last\n    alpha: first\n"));
        let doc: Value = serde_yaml::from_str(&output).unwrap();
        let original: Value = serde_yaml::from_str(DEPLOYMENT).unwrap();
        assert_eq!(doc["metadata"], original["metadata"]);
        assert_eq!(doc["spec"]["replicas"], original["spec"]["replicas"]);
        assert_eq!(
            doc["spec"]["template"]["spec"]["containers"],
            original["spec"]["template"]["spec"]["containers"]
        );
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let once = inject(DEPLOYMENT).unwrap();
        assert_eq!(inject(&once).unwrap(), once);
    }

    #[test]
    fn every_workload_kind_and_multi_document_streams() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: a\n    image: a\n";
        let template =
            "  template:\n    spec:\n      containers:\n      - name: a\n        image: a\n";
        let mut stream = vec![pod.to_string()];
        for kind in ["StatefulSet", "DaemonSet", "Job"] {
            stream.push(format!(
                "kind: {kind}\nmetadata:\n  name: w\nspec:\n{template}"
            ));
        }
        let nested: String = template.lines().map(|l| format!("    {l}\n")).collect();
        stream.push(format!(
            "kind: CronJob\nspec:\n  jobTemplate:\n    spec:\n{nested}"
        ));
        stream.push("apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n".to_string());
        let output = inject(&(stream.join("---\n") + "---\n")).unwrap();
        let documents: Vec<Value> = serde_yaml::Deserializer::from_str(&output)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(documents.len(), 6);
        assert_eq!(names(&documents[0]["spec"], "initContainers").len(), 2);
        for doc in &documents[1..4] {
            assert_eq!(
                names(&doc["spec"]["template"]["spec"], "initContainers").len(),
                2
            );
        }
        let cron = &documents[4]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(names(cron, "initContainers").len(), 2);
        assert_eq!(
            documents[5],
            serde_yaml::from_str::<Value>(&stream[5]).unwrap()
        );
    }

    #[test]
    fn refuses_host_network_pods_and_foreign_containers_with_our_names() {
        let host = DEPLOYMENT.replace(
            "    spec:\n      init",
            "    spec:\n      hostNetwork: true\n      init",
        );
        assert!(error(&host).contains("hostNetwork"));
        assert!(error(&host).contains("document 1 (Deployment web)"));
        let clash = DEPLOYMENT.replace("name: migrate", "name: sidecar-proxy");
        assert!(error(&clash).contains("\"sidecar-proxy\" but no sidecar.ebpf/status"));
        let volume = DEPLOYMENT.replace("name: data", "name: sidecar-certs");
        assert!(error(&volume).contains("volumes entry \"sidecar-certs\""));
        let as_proxy = DEPLOYMENT.replace(
            "name: migrate",
            "name: migrate\n        securityContext:\n          runAsUser: 1337",
        );
        assert!(error(&as_proxy).contains("container \"migrate\" runs as UID or GID 1337"));
        let pod_wide = DEPLOYMENT.replace(
            "    spec:\n      init",
            "    spec:\n      securityContext:\n        runAsGroup: 1337\n      init",
        );
        assert!(error(&pod_wide).contains("runs as UID or GID 1337"));
        let empty = "kind: Pod\nmetadata:\n  name: e\nspec:\n  containers: []\n";
        assert!(error(empty).contains("no containers"));
        assert!(error("kind: Deployment\nspec: {}\n").contains("without spec.template"));
        assert!(error("kind: Pod\n  bad: [\n").contains("not valid YAML"));
    }

    #[test]
    fn a_refusal_anywhere_means_no_output_at_all() {
        let bad = DEPLOYMENT.replace(
            "    spec:\n      init",
            "    spec:\n      hostNetwork: true\n      init",
        );
        let stream = format!("{DEPLOYMENT}---\n{bad}");
        let message = error(&stream);
        assert!(message.starts_with("document 2"), "{message}");
    }

    /// Fuzz target `inject` (`cargo xtask fuzz`; under `cargo test`: its corpus and a second
    /// of random inputs). Any workload YAML is injected or refused with an error; what is
    /// injected is YAML that injecting again leaves exactly as it is.
    #[test]
    fn fuzz_inject() {
        let injection = injection();
        bolero::check!(name = "inject").for_each(|input: &[u8]| {
            let Ok(text) = std::str::from_utf8(input) else {
                return; // read_to_string refuses it before parsing
            };
            let Ok(once) = inject_stream(text, &injection) else {
                return;
            };
            match inject_stream(&once, &injection) {
                Ok(twice) => assert_eq!(twice, once, "injecting again changed it"),
                Err(error) => panic!("the output does not inject again: {error:#}\n{once}"),
            }
        });
    }

    #[test]
    fn bad_options_are_rejected() {
        assert!(Injection::new("", "s", "m").is_err());
        assert!(Injection::new("img", "bad name", "m").is_err());
    }

    #[test]
    fn the_shipped_example_is_the_injected_app() {
        let app = include_str!("../../../deploy/kubernetes/examples/app.yaml");
        let shipped = include_str!("../../../deploy/kubernetes/base/deployment.yaml");
        let injected = inject(app).unwrap();
        let shipped_body: String = shipped
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(
            injected, shipped_body,
            "regenerate base/deployment.yaml with `sidecar inject deploy/kubernetes/examples/app.yaml`"
        );
    }
}
