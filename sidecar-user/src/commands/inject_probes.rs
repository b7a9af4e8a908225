//! Kubelet probes of an injected pod, rewritten to the proxy as Istio does: under STRICT mTLS
//! the kubelet (no mesh certificate) could no longer reach an app's probe port, so each
//! `httpGet`, `tcpSocket` and `grpc` probe of an app container becomes `GET
//! :15020/app-health/<container>/<livez|readyz|startupz>`, and the proxy performs the original
//! against the app (`sidecar proxy --app-probers`, `sidecar-proxy/src/admin/app_health.rs`). `exec` probes need
//! no network and stay.
//!
//! The originals are kept in the `sidecar.ebpf/original-probes` annotation (container -> probe
//! field -> probe, as JSON), so the rewrite can be undone; injection is idempotent as a whole
//! (an injected pod is left alone). `sidecar.ebpf/rewrite-app-probes: "false"` on the pod
//! keeps its probes as they are (Istio's `sidecar.istio.io/rewriteAppHTTPProbers`).
use anyhow::{Context, Result, bail};
use serde_yaml::{Mapping, Value};

pub const ORIGINAL_PROBES_ANNOTATION: &str = "sidecar.ebpf/original-probes";
pub const REWRITE_ANNOTATION: &str = "sidecar.ebpf/rewrite-app-probes";
/// The proxy's environment variable with the probes it performs.
pub const APP_PROBERS_ENV: &str = "SIDECAR_APP_PROBERS";
/// Where the proxy answers the rewritten probes (Istio's status port).
const PROXY_STATUS_PORT: u64 = 15020;
const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];
const NETWORK_ACTIONS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// What the rewrite produced for one pod: the proxy's probers and the annotation's value.
#[derive(Debug, PartialEq)]
pub struct RewrittenProbes {
    /// JSON for [`APP_PROBERS_ENV`]: `/app-health/...` path -> original action and timeout.
    pub probers: String,
    /// JSON for [`ORIGINAL_PROBES_ANNOTATION`].
    pub originals: String,
}

/// Rewrites the probes of the app containers in `spec`; `None` when none uses the network.
pub fn rewrite(spec: &mut Mapping) -> Result<Option<RewrittenProbes>> {
    let mut probers = serde_json::Map::new();
    let mut originals = serde_json::Map::new();
    let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
        return Ok(None);
    };
    for container in containers {
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .context("a container has no name")?
            .to_string();
        let ports = container.get("ports").cloned();
        let Value::Mapping(container) = container else {
            bail!("container {name:?} is not a mapping");
        };
        let mut kept = serde_json::Map::new();
        for (field, endpoint) in PROBES {
            let Some(Value::Mapping(probe)) = container.get(field) else {
                continue;
            };
            let Some(action) = NETWORK_ACTIONS.iter().find(|a| probe.contains_key(**a)) else {
                continue; // exec: nothing to reach over the network
            };
            let path = format!("/app-health/{name}/{endpoint}");
            let mut resolved = probe[*action].clone();
            resolve_port(&mut resolved, ports.as_ref())
                .with_context(|| format!("container {name:?} {field}"))?;
            let mut prober = serde_json::Map::new();
            prober.insert((*action).to_string(), json(&resolved)?);
            if let Some(timeout) = probe.get("timeoutSeconds") {
                prober.insert("timeoutSeconds".into(), json(timeout)?);
            }
            probers.insert(path.clone(), serde_json::Value::Object(prober));
            kept.insert(field.to_string(), json(&Value::Mapping(probe.clone()))?);

            let mut rewritten = probe.clone();
            for action in NETWORK_ACTIONS {
                rewritten.remove(action);
            }
            let mut http_get = Mapping::new();
            http_get.insert("path".into(), path.into());
            http_get.insert("port".into(), PROXY_STATUS_PORT.into());
            http_get.insert("scheme".into(), "HTTP".into());
            rewritten.insert("httpGet".into(), Value::Mapping(http_get));
            container.insert(field.into(), Value::Mapping(rewritten));
        }
        if !kept.is_empty() {
            originals.insert(name, serde_json::Value::Object(kept));
        }
    }
    if probers.is_empty() {
        return Ok(None);
    }
    Ok(Some(RewrittenProbes {
        probers: serde_json::Value::Object(probers).to_string(),
        originals: serde_json::Value::Object(originals).to_string(),
    }))
}

/// A named port (`port: http`) becomes the number the container declares: the proxy has no
/// view of the pod spec.
fn resolve_port(action: &mut Value, ports: Option<&Value>) -> Result<()> {
    let port = action.get("port").context("the probe has no port")?;
    if port.is_u64() {
        return Ok(());
    }
    let name = port
        .as_str()
        .with_context(|| format!("invalid probe port {port:?}"))?;
    let number = ports
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|declared| declared.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|declared| declared.get("containerPort"))
        .and_then(Value::as_u64)
        .with_context(|| format!("probe port {name:?} is not a named port of the container"))?;
    action
        .as_mapping_mut()
        .context("the probe action is not a mapping")?
        .insert("port".into(), number.into());
    Ok(())
}

fn json(value: &Value) -> Result<serde_json::Value> {
    serde_json::to_value(value).context("a probe cannot be written as JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Mapping {
        serde_yaml::from_str(yaml).unwrap()
    }

    const APP: &str = "
containers:
  - name: web
    ports: [{name: http, containerPort: 8080}]
    livenessProbe:
      httpGet: {path: /healthz, port: http, httpHeaders: [{name: X-Probe, value: '1'}]}
      periodSeconds: 5
      timeoutSeconds: 2
    readinessProbe:
      tcpSocket: {port: 8080}
    startupProbe:
      exec: {command: [true]}
  - name: rpc
    readinessProbe:
      grpc: {port: 9090, service: db}
";

    #[test]
    fn network_probes_go_to_the_proxy_and_the_originals_are_kept() -> Result<()> {
        let mut pod = spec(APP);
        let rewritten = rewrite(&mut pod)?.expect("probes to rewrite");
        let web = &pod["containers"][0];
        assert_eq!(
            web["livenessProbe"],
            serde_yaml::from_str::<Value>(
                "{periodSeconds: 5, timeoutSeconds: 2, httpGet: {path: /app-health/web/livez, port: 15020, scheme: HTTP}}"
            )?
        );
        assert_eq!(
            web["readinessProbe"]["httpGet"]["path"],
            "/app-health/web/readyz"
        );
        assert_eq!(
            web["startupProbe"],
            spec(APP)["containers"][0]["startupProbe"]
        );
        assert_eq!(
            pod["containers"][1]["readinessProbe"]["httpGet"]["path"],
            "/app-health/rpc/readyz"
        );

        let probers: serde_json::Value = serde_json::from_str(&rewritten.probers)?;
        assert_eq!(
            probers["/app-health/web/livez"],
            serde_json::json!({"httpGet": {"path": "/healthz", "port": 8080,
                "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2})
        );
        assert_eq!(
            probers["/app-health/web/readyz"],
            serde_json::json!({"tcpSocket": {"port": 8080}})
        );
        assert_eq!(
            probers["/app-health/rpc/readyz"],
            serde_json::json!({"grpc": {"port": 9090, "service": "db"}})
        );
        assert!(probers.get("/app-health/web/startupz").is_none());

        // The annotation restores exactly what was there.
        let originals: serde_json::Value = serde_json::from_str(&rewritten.originals)?;
        let before = spec_json(APP);
        assert_eq!(
            originals["web"]["livenessProbe"],
            before["containers"][0]["livenessProbe"]
        );
        assert_eq!(
            originals["rpc"]["readinessProbe"],
            before["containers"][1]["readinessProbe"]
        );
        assert!(originals["web"].get("startupProbe").is_none());
        Ok(())
    }

    fn spec_json(yaml: &str) -> serde_json::Value {
        serde_json::to_value(spec(yaml)).unwrap()
    }

    #[test]
    fn pods_without_network_probes_are_left_alone() -> Result<()> {
        let mut plain = spec("containers: [{name: a, livenessProbe: {exec: {command: [true]}}}]");
        let before = plain.clone();
        assert_eq!(rewrite(&mut plain)?, None);
        assert_eq!(plain, before);
        Ok(())
    }

    #[test]
    fn an_unknown_named_port_is_an_error_naming_the_probe() {
        let mut bad = spec("containers: [{name: a, readinessProbe: {httpGet: {port: web}}}]");
        let error = format!("{:#}", rewrite(&mut bad).unwrap_err());
        assert!(error.contains("\"a\" readinessProbe"), "{error}");
        assert!(error.contains("\"web\" is not a named port"), "{error}");
    }
}
