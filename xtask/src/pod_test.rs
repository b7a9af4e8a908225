//! `cargo xtask pod-test`: plays the shipped manifests under `podman kube play`, a kubelet
//! stand-in. The client pod is deploy/kubernetes/base/deployment.yaml (init container, proxy,
//! app); the server pod has no sidecar. Checks: the init container attached to the pod's own
//! cgroup (with the pod annotations applied), the app's request to the server is intercepted
//! and answered, the proxy's metrics count it, the server pod is untouched. Then a Job
//! (`sidecar inject`ed, its app one request to the server) completes: without native sidecars
//! its proxy exits by itself once the app is done (`--exit-when-idle-after`), both containers
//! with 0. Teardown leaves no pod, pin, program or cgroup directory behind.
//!
//! podman 4.3 is not a kubelet; the harness (never the shipped manifests) adapts the copy it
//! plays: `restartPolicy: Never` (init containers take the pod's policy), the native sidecar
//! moved into `containers` (podman would wait for it to exit), Secret/ConfigMap/downward API
//! volumes as hostPath directories it fills, and no containerPorts (podman publishes them on
//! the host, where they would collide). It plays no Job: the Job's pod template is played as
//! the Pod the Job controller would create.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_yaml::{Mapping, Value};
use sidecar_common::{CaptureReport, PinLayout, StatusReport};
use sidecar_tests::{MeshPki, PROXY_METRICS_URL, PROXY_READY_URL, prometheus};

use crate::{
    image,
    util::{run, workspace_root},
};

const CLIENT_POD: &str = "sidecar-podtest-client";
const SERVER_POD: &str = "sidecar-podtest-server";
const JOB_POD: &str = "sidecar-podtest-job";
/// What the Job's proxy is told, as KUBERNETES.md tells pods without native sidecars.
const JOB_PROXY_ARGS: [&str; 2] = ["--exit-when-idle-after", "2s"];
/// The Job's app and proxy must both have exited within this.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const SERVER_PORT: u16 = 8080;
/// The namespace the workload certificate names (podman has none).
const POD_NAMESPACE: &str = "default";
/// What the shipped example's annotations ask for (`excludeOutboundPorts: '5432'`).
const ANNOTATED_EXCLUDED_PORT: &str = "5432";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

const CONTAINERS_CONF: &str = r#"# Written by `cargo xtask pod-test` (see shared lab notes on podman pods).
[containers]
# rlimits cannot be raised in this environment: stay within the current ones.
default_ulimits = ["nofile=10000:10000", "nproc=10000:10000"]
[engine]
cgroup_manager = "cgroupfs"   # no systemd
runtime = "runc"              # crun refuses cgroup hybrid mode
"#;

/// A pod that `kube play` created: what teardown needs, recorded before anything can fail.
struct PlayedPod {
    id: String,
    /// `/libpod_parent/<id>`, relative to every cgroup hierarchy.
    cgroup: PathBuf,
}

/// The mesh ConfigMap the manifests ship, whose `mesh.yaml` the pod's proxy runs with.
const SHIPPED_MESH_CONFIG: &str = "deploy/kubernetes/base/mesh-config.yaml";

pub fn run_pod_test() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("pod-test runs privileged podman pods and loads BPF programs: run it as root");
    }
    let started = Instant::now();
    let bin_dir = image::build_images()?;
    let sidecar = bin_dir.join("sidecar");
    let work = workspace_root().join("target/pod-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("containers.conf"), CONTAINERS_CONF)?;
    let podman = Podman {
        conf: work.join("containers.conf"),
    };
    // Leftovers of an interrupted run would make `kube play` fail on the names.
    for name in [CLIENT_POD, SERVER_POD, JOB_POD] {
        let _ = podman.output(&["pod", "rm", "-f", "-t", "0", name]);
    }
    let mut pods = Vec::new();
    let result = exercise(&podman, &work, &sidecar, &mut pods);
    let cleaned = teardown(&podman, &sidecar, &pods);
    result?;
    cleaned?;
    println!(
        "pod-test: passed in {:.0?} (images included)",
        started.elapsed()
    );
    Ok(())
}

fn exercise(podman: &Podman, work: &Path, sidecar: &Path, pods: &mut Vec<PlayedPod>) -> Result<()> {
    let server_yaml = work.join("server.yaml");
    std::fs::write(&server_yaml, server_pod_yaml())?;
    let client_yaml = work.join("client.yaml");
    let shipped = workspace_root().join("deploy/kubernetes/base/deployment.yaml");
    let mesh_config = workspace_root().join(SHIPPED_MESH_CONFIG);
    let stand_ins = StandIns {
        certs: write_certs(work, sidecar)?,
        mesh_config: write_mesh_config(&mesh_config, work)?,
    };
    std::fs::write(&client_yaml, client_for_podman(&shipped, &stand_ins, work)?)?;

    println!("== kube play: server pod (no sidecar), then the client pod (the shipped manifest)");
    podman.play(&server_yaml, pods)?;
    podman.play(&client_yaml, pods)?;
    let [server, client] = &pods[..] else {
        bail!("expected two pods from kube play, got {}", pods.len());
    };

    let client_app = podman.container(&client.id, "app")?;
    let server_ip = podman.pod_ip(&server.id)?;
    wait_until_ready(podman, &client_app)?;

    println!("== the app's request to the server pod ({server_ip}:{SERVER_PORT})");
    let url = format!("http://{server_ip}:{SERVER_PORT}/");
    let (status, body) = podman.http_get(&client_app, &url)?;
    println!("{status} {body}");
    if status != 200 || !body.contains("hello from server") {
        bail!("the app's request to {url} did not get the server's answer: {status} {body}");
    }

    println!("== the proxy's metrics and access log");
    let (_, metrics) = podman.http_get(&client_app, PROXY_METRICS_URL)?;
    // Outbound series: TCP connections (exported from the start), and HTTP requests when the
    // proxy detects HTTP (exported once the first request is counted).
    let source = [("reporter", "source")];
    let scrape = |error: String| anyhow::anyhow!("the proxy's metrics: {error}");
    let opened =
        prometheus::sum(&metrics, "istio_tcp_connections_opened_total", &source).map_err(scrape)?;
    let requests = prometheus::sum_if_exported(&metrics, "istio_requests_total", &source)
        .map_err(scrape)?
        .unwrap_or(0.0);
    println!("outbound: {opened} TCP connections opened, {requests} HTTP requests");
    let count = opened + requests;
    if count < 1.0 {
        bail!("the proxy's metrics count no outbound connection or request: {metrics}");
    }
    let proxy_log = podman.logs(&podman.container(&client.id, "sidecar-proxy")?)?;
    let access = proxy_log
        .lines()
        .find(|line| line.contains(&format!("{server_ip}:{SERVER_PORT}")))
        .context("no access log line for the server in the proxy's log")?;
    println!("{access}");

    println!(
        "== capture (sidecar status): the client pod's own cgroup only, its annotations applied"
    );
    let status = capture_status(sidecar)?;
    let captured: Vec<&CaptureReport> = status
        .ebpf
        .iter()
        .filter(|entry| {
            entry
                .cgroup
                .as_ref()
                .is_some_and(|path| path.to_string_lossy().contains("libpod_parent/"))
        })
        .collect();
    let ours = |pod: &PlayedPod| {
        captured.iter().find(|entry| {
            entry
                .cgroup
                .as_ref()
                .is_some_and(|path| path.to_string_lossy().ends_with(&pod.id))
        })
    };
    let client_capture = ours(client).context("no capture listed for the client pod")?;
    let excluded = &client_capture.excluded_ports;
    println!(
        "client pod {:?}: excluded ports {excluded}, counters {:?}",
        client_capture.cgroup, client_capture.counters
    );
    if !excluded.split(',').any(|p| p == ANNOTATED_EXCLUDED_PORT) {
        bail!("the pod annotation excludeOutboundPorts={ANNOTATED_EXCLUDED_PORT} was not applied");
    }
    if ours(server).is_some() {
        bail!("the server pod, which has no sidecar, has capture attached");
    }
    println!("server pod: no capture attached");

    run_job(podman, work, sidecar, &stand_ins, server_ip, pods)
}

/// A Job whose app makes one request to the server and exits: its pod completes, the proxy
/// exiting by itself once the app is done.
fn run_job(
    podman: &Podman,
    work: &Path,
    sidecar: &Path,
    stand_ins: &StandIns,
    server_ip: std::net::IpAddr,
    pods: &mut Vec<PlayedPod>,
) -> Result<()> {
    let url = format!("http://{server_ip}:{SERVER_PORT}/");
    println!(
        "== a Job (sidecar inject), its app one request to {url}; its proxy with {}",
        JOB_PROXY_ARGS.join(" ")
    );
    let job_yaml = work.join("job.yaml");
    std::fs::write(&job_yaml, job_yaml_text(&url))?;
    let injected = checked(Command::new(sidecar).arg("inject").arg(&job_yaml))?;
    let job: Value = serde_yaml::from_slice(&injected.stdout).context("sidecar inject's Job")?;
    let job_pod_yaml = work.join("job-pod.yaml");
    std::fs::write(&job_pod_yaml, job_pod_for_podman(&job, stand_ins, work)?)?;
    podman.play(&job_pod_yaml, pods)?;
    let job_pod = pods.last().context("the Job's pod")?.id.clone();
    let app = podman.container(&job_pod, "app")?;
    let proxy = podman.container(&job_pod, "sidecar-proxy")?;

    let started = Instant::now();
    let ended = |container: &str| -> Result<Option<i64>> {
        let state = podman.text(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            container,
        ])?;
        Ok(match state.split_once(' ') {
            Some(("exited", code)) => Some(code.parse()?),
            _ => None,
        })
    };
    let (app_code, proxy_code) = loop {
        if let (Some(app_code), Some(proxy_code)) = (ended(&app)?, ended(&proxy)?) {
            break (app_code, proxy_code);
        }
        if started.elapsed() > JOB_TIMEOUT {
            bail!(
                "the Job's containers had not both exited after {JOB_TIMEOUT:?}\napp:\n{}\nproxy:\n{}",
                podman.logs(&app)?,
                podman.logs(&proxy)?
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let app_log = podman.logs(&app)?;
    let proxy_log = podman.logs(&proxy)?;
    println!("app exited with {app_code}:\n{}", app_log.trim());
    let why = proxy_log
        .lines()
        .filter(|line| line.contains("it is done") || line.contains("drained"))
        .collect::<Vec<_>>()
        .join("\n");
    println!(
        "proxy exited with {proxy_code} after {:.1?}:\n{why}",
        started.elapsed()
    );
    // Its log has the response's JSON line, and a line per attempt the proxy was not up for.
    let answered = app_log
        .lines()
        .filter_map(|line| serde_json::from_str::<sidecar_tests::HttpResponse>(line).ok())
        .any(|response| response.status == 200 && response.body.contains("hello from server"));
    if app_code != 0 || !answered {
        bail!("the Job's app did not get the server's answer (exit {app_code}):\n{app_log}");
    }
    if proxy_code != 0 || !why.contains("it is done") {
        bail!("the Job's proxy did not exit by itself with 0 (exit {proxy_code}):\n{proxy_log}");
    }
    Ok(())
}

/// Polls the proxy's readiness from inside the pod: podman ignores probes and start order.
fn wait_until_ready(podman: &Podman, app: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let answer = podman.http_get(app, PROXY_READY_URL);
        if answer.as_ref().is_ok_and(|(status, _)| *status == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the proxy was not ready within {READY_TIMEOUT:?}: {answer:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn capture_status(sidecar: &Path) -> Result<StatusReport> {
    let out = checked(Command::new(sidecar).args(["status", "--json"]))?;
    StatusReport::from_json(&out.stdout).map_err(|error| anyhow::anyhow!(error))
}

/// Removes the pods, the capture, and the cgroup directories podman leaves behind; then checks
/// that nothing is left. Runs whether or not the test passed.
fn teardown(podman: &Podman, sidecar: &Path, pods: &[PlayedPod]) -> Result<()> {
    println!("== teardown");
    let v2_root = sidecar_tests::cgroup2_root()?;
    let pin_dirs: Vec<PathBuf> = pods
        .iter()
        .filter_map(|pod| std::fs::metadata(v2_root.join(rel(&pod.cgroup))).ok())
        .map(|meta| PinLayout::default().capture_dir(meta.ino()))
        .collect();
    for pod in pods {
        podman.output(&["pod", "rm", "-f", "-t", "0", &pod.id])?;
        let v2_dir = v2_root.join(rel(&pod.cgroup));
        if v2_dir.exists() {
            run(Command::new(sidecar)
                .args(["cleanup", "--cgroup"])
                .arg(&v2_dir))?;
        }
        for hierarchy in cgroup_hierarchies()? {
            remove_cgroup_tree(&hierarchy.join(rel(&pod.cgroup)))?;
            // The shared parent goes too once no pod is left in it (fails harmlessly if not).
            let _ = std::fs::remove_dir(hierarchy.join("libpod_parent"));
        }
    }
    let mut left = Vec::new();
    for pod in pods {
        for hierarchy in cgroup_hierarchies()? {
            let dir = hierarchy.join(rel(&pod.cgroup));
            if dir.exists() {
                left.push(dir);
            }
        }
    }
    left.extend(pin_dirs.into_iter().filter(|dir| dir.exists()));
    if !left.is_empty() {
        bail!("teardown left these behind: {left:?}");
    }
    println!(
        "pods, capture pins (and so their programs) and {} cgroup directories removed",
        pods.len()
    );
    Ok(())
}

fn rel(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

/// Every mounted cgroup hierarchy: the v1 controllers, `systemd` and `unified` on hybrid
/// hosts, or the single v2 tree.
fn cgroup_hierarchies() -> Result<Vec<PathBuf>> {
    let mut hierarchies = vec![sidecar_tests::cgroup2_root()?];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for entry in entries.flatten() {
            let path = entry.path();
            let is_mount = rustix::fs::statfs(&path).is_ok_and(|fs| {
                // cgroup v1 (0x27e0eb) and cgroup2 (0x63677270) filesystems.
                fs.f_type == 0x0027_e0eb || fs.f_type == 0x6367_7270
            });
            if is_mount && !path.is_symlink() && !hierarchies.contains(&path) {
                hierarchies.push(path);
            }
        }
    }
    Ok(hierarchies)
}

/// rmdir, children first; retried briefly while the last processes exit.
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let children: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    for child in children {
        remove_cgroup_tree(&child)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                return Err(error).with_context(|| format!("cannot remove {}", dir.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The server: a plain pod (no sidecar) answering HTTP on SERVER_PORT.
fn server_pod_yaml() -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {SERVER_POD}
spec:
  restartPolicy: Never
  containers:
  - name: app
    image: {image}
    args: [http-server, --listen, '[::]:{SERVER_PORT}', --name, server]
",
        image = image::LABTOOL_IMAGE
    )
}

/// The Job the harness injects: its app one GET to `url`, retried while the proxy (an
/// ordinary container under podman, started alongside the app) is not listening yet.
fn job_yaml_text(url: &str) -> String {
    format!(
        "apiVersion: batch/v1
kind: Job
metadata:
  name: {JOB_POD}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      serviceAccountName: demo
      securityContext:
        runAsNonRoot: true
      containers:
      - name: app
        image: {image}
        args: [http-get, --retry-for-ms, '20000', '{url}']
        securityContext:
          runAsUser: 1000
          runAsGroup: 1000
",
        image = image::LABTOOL_IMAGE
    )
}

/// What stands in for the Secret and the ConfigMap volumes, shared by the pods.
struct StandIns {
    certs: PathBuf,
    mesh_config: PathBuf,
}

/// The shipped Deployment, adapted for podman (see the module docs).
fn client_for_podman(deployment: &Path, stand_ins: &StandIns, work: &Path) -> Result<String> {
    let mut doc = yaml_file(deployment)?;
    doc["metadata"]["name"] = CLIENT_POD.into();
    doc["spec"]["replicas"] = 1.into();
    pod_template_for_podman(
        &mut doc["spec"]["template"],
        stand_ins,
        &work.join("podinfo"),
        &[],
    )?;
    Ok(serde_yaml::to_string(&doc)?)
}

/// The Pod the Job controller would create from the injected `job`, adapted for podman, its
/// proxy given [`JOB_PROXY_ARGS`].
fn job_pod_for_podman(job: &Value, stand_ins: &StandIns, work: &Path) -> Result<String> {
    let mut template = job["spec"]["template"].clone();
    pod_template_for_podman(
        &mut template,
        stand_ins,
        &work.join("job-podinfo"),
        &JOB_PROXY_ARGS,
    )?;
    let mut metadata = template["metadata"]
        .as_mapping()
        .cloned()
        .unwrap_or_default();
    metadata.insert("name".into(), JOB_POD.into());
    let mut pod = Mapping::new();
    pod.insert("apiVersion".into(), "v1".into());
    pod.insert("kind".into(), "Pod".into());
    pod.insert("metadata".into(), Value::Mapping(metadata));
    pod.insert("spec".into(), template["spec"].clone());
    Ok(serde_yaml::to_string(&pod)?)
}

/// Adapts a pod template for podman (see the module docs): the downward API's annotations
/// written to `podinfo`, the Secret and ConfigMap replaced by `stand_ins`; the native sidecar,
/// moved into `containers`, gets `proxy_args` too.
fn pod_template_for_podman(
    template: &mut Value,
    stand_ins: &StandIns,
    podinfo: &Path,
    proxy_args: &[&str],
) -> Result<()> {
    let annotations = template["metadata"]["annotations"]
        .as_mapping()
        .cloned()
        .unwrap_or_default();
    let spec = template["spec"]
        .as_mapping_mut()
        .context("the pod template has no spec")?;
    spec.insert("restartPolicy".into(), "Never".into());

    let mut init_containers = Vec::new();
    let mut containers = Vec::new();
    for mut container in sequence(spec, "initContainers") {
        let native_sidecar = container.get("restartPolicy") == Some(&"Always".into());
        if let Value::Mapping(fields) = &mut container {
            fields.remove("restartPolicy");
        }
        if native_sidecar {
            if let Some(Value::Sequence(args)) = container.get_mut("args") {
                args.extend(proxy_args.iter().map(|&arg| Value::from(arg)));
            }
            containers.push(container);
        } else {
            init_containers.push(container);
        }
    }
    containers.extend(sequence(spec, "containers"));
    for container in init_containers.iter_mut().chain(containers.iter_mut()) {
        if let Value::Mapping(fields) = container {
            fields.remove("ports");
            set_namespace_env(fields);
        }
    }
    spec.insert("initContainers".into(), Value::Sequence(init_containers));
    spec.insert("containers".into(), Value::Sequence(containers));

    let mut volumes = sequence(spec, "volumes");
    for volume in &mut volumes {
        let Value::Mapping(fields) = volume else {
            continue;
        };
        let stand_in = if fields.contains_key("secret") {
            fields.remove("secret");
            stand_ins.certs.clone()
        } else if fields.contains_key("configMap") {
            fields.remove("configMap");
            stand_ins.mesh_config.clone()
        } else if fields.contains_key("downwardAPI") {
            fields.remove("downwardAPI");
            write_annotations(&annotations, podinfo)?
        } else {
            continue;
        };
        let mut host_path = Mapping::new();
        host_path.insert("path".into(), stand_in.display().to_string().into());
        host_path.insert("type".into(), "Directory".into());
        fields.insert("hostPath".into(), Value::Mapping(host_path));
    }
    spec.insert("volumes".into(), Value::Sequence(volumes));
    Ok(())
}

/// podman has no namespaces: an env var from `fieldRef: metadata.namespace` becomes a value.
fn set_namespace_env(container: &mut Mapping) {
    let Some(Value::Sequence(env)) = container.get_mut("env") else {
        return;
    };
    for var in env {
        let from_namespace = var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace";
        if let (true, Value::Mapping(fields)) = (from_namespace, var) {
            fields.remove("valueFrom");
            fields.insert("value".into(), POD_NAMESPACE.into());
        }
    }
}

fn sequence(spec: &Mapping, key: &str) -> Vec<Value> {
    spec.get(key)
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default()
}

fn yaml_file(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))
}

/// The Secret's stand-in: a lab CA (`<work>/ca`) and the workload's SPIFFE certificate
/// (`<work>/certs`), readable by 1337.
fn write_certs(work: &Path, sidecar: &Path) -> Result<PathBuf> {
    let pki = MeshPki::create(sidecar, work, None)?;
    pki.issue("certs", POD_NAMESPACE, "demo", &[])
}

/// The ConfigMap's stand-in: its `mesh.yaml` key as a file, with the access log on (off by
/// default, as in Istio): the test shows the app's request in it.
fn write_mesh_config(config_map: &Path, work: &Path) -> Result<PathBuf> {
    let doc = yaml_file(config_map)?;
    let mesh = doc["data"]["mesh.yaml"]
        .as_str()
        .context("the mesh ConfigMap has no mesh.yaml")?;
    let dir = work.join("config");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("mesh.yaml"), with_access_log(mesh)?)?;
    Ok(dir)
}

/// `mesh` (a mesh config) with `http.accessLog: true`, set in its own `http` section if it has
/// one, so no key is written twice.
fn with_access_log(mesh: &str) -> Result<String> {
    let mut mesh: Value = serde_yaml::from_str(mesh).context("the mesh config is not YAML")?;
    let http = mesh
        .as_mapping_mut()
        .context("the mesh config is not a mapping")?
        .entry("http".into())
        .or_insert_with(|| Mapping::new().into());
    http.as_mapping_mut()
        .context("the mesh config's `http` is not a mapping")?
        .insert("accessLog".into(), true.into());
    Ok(serde_yaml::to_string(&mesh)?)
}

/// The downward API's stand-in, in `dir`: `key="value"` lines, sorted and quoted as the
/// kubelet does.
fn write_annotations(annotations: &Mapping, dir: &Path) -> Result<PathBuf> {
    let mut lines: Vec<String> = annotations
        .iter()
        .filter_map(|(key, value)| Some((key.as_str()?, value.as_str()?)))
        .map(|(key, value)| format!("{key}={value:?}"))
        .collect();
    lines.sort();
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("annotations"), lines.join("\n") + "\n")?;
    Ok(dir.to_path_buf())
}

/// podman with the harness's containers.conf.
struct Podman {
    conf: PathBuf,
}

impl Podman {
    fn output(&self, args: &[&str]) -> Result<Output> {
        checked(
            Command::new("podman")
                .env("CONTAINERS_CONF", &self.conf)
                .args(args),
        )
    }

    fn text(&self, args: &[&str]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.output(args)?.stdout)
            .trim()
            .to_string())
    }

    /// `kube play`. Every pod it
    /// created is recorded in `pods` even when it fails, so that teardown finds it.
    fn play(&self, yaml: &Path, pods: &mut Vec<PlayedPod>) -> Result<()> {
        let before = self.pod_ids()?;
        let played = self.output(&["kube", "play", yaml.to_str().context("non-UTF-8 path")?]);
        for id in self.pod_ids()? {
            if !before.contains(&id) {
                let cgroup = self.text(&["pod", "inspect", "--format", "{{.CgroupPath}}", &id])?;
                println!("pod {id} (cgroup {cgroup})");
                pods.push(PlayedPod {
                    id,
                    cgroup: PathBuf::from(cgroup),
                });
            }
        }
        played.map(|_| ())
    }

    fn pod_ids(&self) -> Result<Vec<String>> {
        Ok(self
            .text(&["pod", "ps", "--quiet", "--no-trunc"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// The container of the pod whose Kubernetes name is `name` (podman: `<pod>-<name>`).
    fn container(&self, pod: &str, name: &str) -> Result<String> {
        let names = self.text(&[
            "ps",
            "-a",
            "--filter",
            &format!("pod={pod}"),
            "--format",
            "{{.Names}}",
        ])?;
        names
            .lines()
            .find(|line| line.ends_with(&format!("-{name}")))
            .map(str::to_string)
            .with_context(|| format!("no container {name} in pod {pod}: {names}"))
    }

    fn pod_ip(&self, pod: &str) -> Result<std::net::IpAddr> {
        let infra = self.text(&["pod", "inspect", "--format", "{{.InfraContainerID}}", pod])?;
        let ip = self.text(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &infra,
        ])?;
        ip.parse()
            .with_context(|| format!("pod {pod} has no IP address ({ip:?})"))
    }

    fn logs(&self, container: &str) -> Result<String> {
        let out = self.output(&["logs", container])?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// GET from inside a container (its cgroup, so its netns and its capture): status, body.
    fn http_get(&self, container: &str, url: &str) -> Result<(u16, String)> {
        let answer = self.text(&["exec", container, "/labtool", "http-get", url])?;
        let response: sidecar_tests::HttpResponse = serde_json::from_str(&answer)
            .with_context(|| format!("labtool http-get {url} answered {answer:?}"))?;
        Ok((response.status, response.body))
    }
}

fn checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_log_is_set_in_the_configs_own_http_section() -> Result<()> {
        let shipped = "inbound:\n  mode: STRICT\nhttp:\n  services: []\n";
        let config: Value = serde_yaml::from_str(&with_access_log(shipped)?)?;
        assert_eq!(config["http"]["accessLog"], Value::Bool(true));
        assert_eq!(config["http"]["services"], Value::Sequence(Vec::new()));
        assert_eq!(config["inbound"]["mode"], Value::from("STRICT"));
        Ok(())
    }

    #[test]
    fn the_shipped_mesh_config_gets_the_access_log() -> Result<()> {
        let config_map = yaml_file(&workspace_root().join(SHIPPED_MESH_CONFIG))?;
        let shipped = config_map["data"]["mesh.yaml"]
            .as_str()
            .context("no mesh.yaml")?;
        let config: Value = serde_yaml::from_str(&with_access_log(shipped)?)?;
        assert_eq!(config["http"]["accessLog"], Value::Bool(true));
        Ok(())
    }

    #[test]
    fn a_config_without_http_gets_one() -> Result<()> {
        let config: Value = serde_yaml::from_str(&with_access_log("inbound: {}\n")?)?;
        assert_eq!(config["http"]["accessLog"], Value::Bool(true));
        Ok(())
    }
}
