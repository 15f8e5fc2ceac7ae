//! `meshd inject -f deployment.yaml`: prints the manifest with meshd added to every pod
//! template, as `istioctl kube-inject` does for Envoy.
//!
//! Flow: the file is read as a stream of YAML documents; each workload (Pod, Deployment,
//! StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, and the items of a List) gets, in its
//! pod spec, [`mutate_pod`] (which `meshd injector` runs too): [`exemption`] decides, and
//! [`pod_additions`], a plain function of the pod's metadata and the options,
//! with no I/O. Everything else (Services, ConfigMaps, ...) passes through unchanged, as
//! do pods that opt out (`meshd.io/inject: "false"`), pods on the node's network
//! (`hostNetwork: true`: their iptables are the node's) and pods that already have a
//! `meshd` container, so injecting twice is injecting once.
//!
//! What a pod gets:
//! - init container `meshd-init`: `meshd iptables install` (NET_ADMIN, NET_RAW, as root),
//!   with the pod's `meshd.io/inbound-ports`, `meshd.io/exclude-outbound-ports` and
//!   `meshd.io/exclude-outbound-cidrs` annotations as options; left out with
//!   `meshd.io/interception: "false"`;
//! - the sidecar `meshd` as a native sidecar (an init container with `restartPolicy:
//!   Always`, Kubernetes 1.29+): it starts, and is ready, before the app's containers, and
//!   does not keep a Job's pod alive. It runs as the proxy uid (1337) with a read-only root
//!   and no capabilities; its probes run `meshd probe` inside the pod, since the admin
//!   server listens on loopback;
//! - volumes: the config map `<service>-meshd` (meshd.yaml, and the policy it names) at
//!   /etc/meshd, and the SPIRE agent's socket folder at /run/spire/sockets, from the SPIFFE
//!   CSI driver (or a host path).

use serde_yaml_ng::{Mapping, Value};
use std::path::{Path, PathBuf};

/// The proxy uid: the one the iptables rules let through (Istio's 1337).
pub const PROXY_UID: u32 = 1337;

/// Why a manifest could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A document is not YAML; the position is the parser's.
    #[error("{path}: {error}")]
    Yaml {
        path: PathBuf,
        error: serde_yaml_ng::Error,
    },
    /// A workload whose pod spec is not where its kind puts it, or not a mapping.
    #[error("{path}: document {doc} ({kind} {name}): {what}")]
    Shape {
        path: PathBuf,
        doc: usize,
        kind: String,
        name: String,
        what: String,
    },
}

/// The options of `meshd inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The manifest (one or more YAML documents); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// What the sidecar is made of.
    #[command(flatten)]
    pub sidecar: SidecarOptions,
}

/// What a pod's sidecar is made of: the options `meshd inject` and `meshd injector` share.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarOptions {
    /// The meshd image of the sidecar and its init container.
    #[arg(long, default_value = concat!("ghcr.io/meshd/meshd:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The config map with meshd.yaml (default: `<service>-meshd`, the service from the
    /// pod's `meshd.io/service` annotation, else its `app.kubernetes.io/name` or `app`
    /// label, else the workload's name).
    #[arg(long)]
    pub config_map: Option<String>,
    /// Mount the SPIRE agent's socket folder from this host path instead of the SPIFFE
    /// CSI driver (`csi.spiffe.io`).
    #[arg(long)]
    pub spire_host_path: Option<String>,
}

/// Why a pod is left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exemption {
    /// The pod says `meshd.io/inject: "false"`.
    OptedOut,
    /// The pod is on the node's network: its iptables are the node's.
    HostNetwork,
    /// The pod already has a `meshd` container: injecting twice is injecting once.
    AlreadyInjected,
}

impl Exemption {
    /// The reason as a word, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Exemption::OptedOut => "opted out (meshd.io/inject: \"false\")",
            Exemption::HostNetwork => "hostNetwork pod",
            Exemption::AlreadyInjected => "already has the meshd sidecar",
        }
    }
}

/// What [`mutate_pod`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodOutcome {
    /// The pod got the init step, the sidecar and the volumes.
    Injected,
    /// The pod is left as it is, and why.
    LeftAlone(Exemption),
}

/// Why a pod could not be mutated: its spec is not where or what Kubernetes puts there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodShapeError {
    /// No `spec` mapping under the pod (template).
    #[error("the pod template has no spec mapping")]
    NoSpec,
    /// No `containers` list in the spec.
    #[error("the pod spec has no containers list")]
    NoContainers,
    /// `initContainers` or `volumes` is there but not a list.
    #[error("spec.{0} is not a list")]
    NotAList(&'static str),
}

/// Reads the manifest, injects every pod template, and returns the documents as YAML.
pub fn inject_file(args: &InjectArgs) -> Result<String, InjectError> {
    let path = args.file.clone();
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(&path)
    }
    .map_err(|error| InjectError::Read {
        path: path.clone(),
        error,
    })?;
    inject_text(&text, &path, args)
}

/// [`inject_file`] on text already read.
pub fn inject_text(text: &str, path: &Path, args: &InjectArgs) -> Result<String, InjectError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let mut value = Value::deserialize(doc).map_err(|error| InjectError::Yaml {
            path: path.to_path_buf(),
            error,
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        inject_document(&mut value, args, path, i + 1)?;
        let yaml = serde_yaml_ng::to_string(&value).map_err(|error| InjectError::Yaml {
            path: path.to_path_buf(),
            error,
        })?;
        out.push(yaml);
    }
    Ok(out.join("---\n"))
}

pub(super) fn text_at<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Injects document `doc` (1-based) of the file at `path` in place; a kind without pods
/// is left as it is.
fn inject_document(
    value: &mut Value,
    args: &InjectArgs,
    path: &Path,
    doc: usize,
) -> Result<(), InjectError> {
    let kind = text_at(value, &["kind"]).unwrap_or("").to_string();
    let name = text_at(value, &["metadata", "name"])
        .unwrap_or("<unnamed>")
        .to_string();
    let shape = |what: String| InjectError::Shape {
        path: path.to_path_buf(),
        doc,
        kind: kind.clone(),
        name: name.clone(),
        what,
    };
    let template_path: &[&str] = match kind.as_str() {
        "List" => {
            let items = value.get_mut("items").and_then(Value::as_sequence_mut);
            for item in items.into_iter().flatten() {
                inject_document(item, args, path, doc)?;
            }
            return Ok(());
        }
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(()),
    };
    let mut pod = &mut *value;
    for key in template_path {
        pod = pod
            .get_mut(key)
            .ok_or_else(|| shape(format!("no {} here", template_path.join("."))))?;
    }
    mutate_pod(pod, &name, &args.sidecar).map_err(|e| shape(e.to_string()))?;
    Ok(())
}

/// Why the pod with this metadata and spec is left alone, or `None` to inject it: the one
/// decision of `meshd inject` and `meshd injector`.
pub fn exemption(meta: &Value, spec: &Mapping, containers: &[Value]) -> Option<Exemption> {
    let inits = spec.get("initContainers").and_then(Value::as_sequence);
    if text_at(meta, &["annotations", "meshd.io/inject"]) == Some("false") {
        return Some(Exemption::OptedOut);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Some(Exemption::HostNetwork);
    }
    let injected = containers
        .iter()
        .chain(inits.into_iter().flatten())
        .any(|c| text_at(c, &["name"]) == Some("meshd"));
    injected.then_some(Exemption::AlreadyInjected)
}

/// The mutation: gives the pod (a Pod, or a workload's pod template: a mapping with
/// `metadata` and `spec`) of workload `workload` the additions of [`pod_additions`], unless
/// [`exemption`] says to leave it alone.
pub fn mutate_pod(
    pod: &mut Value,
    workload: &str,
    options: &SidecarOptions,
) -> Result<PodOutcome, PodShapeError> {
    let meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or(PodShapeError::NoSpec)?;
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .ok_or(PodShapeError::NoContainers)?;
    if let Some(why) = exemption(&meta, spec, containers) {
        return Ok(PodOutcome::LeftAlone(why));
    }
    let Some(add) = pod_additions(&meta, workload, options) else {
        return Ok(PodOutcome::LeftAlone(Exemption::OptedOut));
    };
    // In front of the pod's own init containers, so that they too run with the sidecar.
    list_at(spec, "initContainers")
        .ok_or(PodShapeError::NotAList("initContainers"))?
        .splice(0..0, add.init_containers);
    list_at(spec, "volumes")
        .ok_or(PodShapeError::NotAList("volumes"))?
        .extend(add.volumes);
    Ok(PodOutcome::Injected)
}

/// The list at `key`, created empty when absent; `None` when something else is there.
fn list_at<'a>(spec: &'a mut Mapping, key: &str) -> Option<&'a mut Vec<Value>> {
    spec.entry(Value::from(key))
        .or_insert_with(|| Value::Sequence(Vec::new()))
        .as_sequence_mut()
}

/// What one pod gets: init containers (the iptables step, then the sidecar) and volumes.
#[derive(Debug, PartialEq)]
pub struct PodAdditions {
    pub init_containers: Vec<Value>,
    pub volumes: Vec<Value>,
}

/// The additions for a pod with this metadata (annotations and labels), in a workload
/// called `workload`; `None` when the pod opts out with `meshd.io/inject: "false"`.
pub fn pod_additions(meta: &Value, workload: &str, args: &SidecarOptions) -> Option<PodAdditions> {
    let annotation = |k: &str| text_at(meta, &["annotations", k]);
    if annotation("meshd.io/inject") == Some("false") {
        return None;
    }
    let service = annotation("meshd.io/service")
        .or_else(|| text_at(meta, &["labels", "app.kubernetes.io/name"]))
        .or_else(|| text_at(meta, &["labels", "app"]))
        .unwrap_or(workload);
    let config_map = args
        .config_map
        .clone()
        .unwrap_or_else(|| format!("{service}-meshd"));
    let mut init_containers = Vec::new();
    if annotation("meshd.io/interception") != Some("false") {
        let mut command = vec![
            "meshd".to_string(),
            "iptables".into(),
            "install".into(),
            "--proxy-uid".into(),
            PROXY_UID.to_string(),
        ];
        for (key, flag) in [
            ("meshd.io/inbound-ports", "--inbound-ports"),
            (
                "meshd.io/exclude-outbound-ports",
                "--exclude-outbound-ports",
            ),
            (
                "meshd.io/exclude-outbound-cidrs",
                "--exclude-outbound-cidrs",
            ),
        ] {
            if let Some(v) = annotation(key).map(|v| v.replace(' ', "")) {
                command.extend([flag.to_string(), v]);
            }
        }
        init_containers.push(yaml(&format!(
            r#"name: meshd-init
image: {image}
command: {command}
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{add: [NET_ADMIN, NET_RAW], drop: [ALL]}}
resources:
  requests: {{cpu: 10m, memory: 16Mi}}
"#,
            image = quoted(&args.image),
            command = serde_json::to_string(&command).unwrap_or_default(),
        )));
    }
    init_containers.push(yaml(&format!(
        r#"name: meshd
image: {image}
restartPolicy: Always
args: [run, --config, /etc/meshd/meshd.yaml]
ports:
  - {{name: meshd-mtls, containerPort: 15006, protocol: TCP}}
startupProbe:
  exec: {{command: [meshd, probe, /ready]}}
  periodSeconds: 1
  failureThreshold: 60
readinessProbe:
  exec: {{command: [meshd, probe, /ready]}}
  periodSeconds: 5
livenessProbe:
  exec: {{command: [meshd, probe, /live]}}
  periodSeconds: 10
securityContext:
  runAsUser: {uid}
  runAsGroup: {uid}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{drop: [ALL]}}
resources:
  requests: {{cpu: 50m, memory: 32Mi}}
volumeMounts:
  - {{name: meshd-config, mountPath: /etc/meshd, readOnly: true}}
  - {{name: spire-agent-socket, mountPath: /run/spire/sockets, readOnly: true}}
"#,
        image = quoted(&args.image),
        uid = PROXY_UID,
    )));
    let socket = match &args.spire_host_path {
        Some(dir) => format!("hostPath: {{path: {}, type: Directory}}", quoted(dir)),
        None => "csi: {driver: csi.spiffe.io, readOnly: true}".to_string(),
    };
    let volumes = vec![
        yaml(&format!(
            "name: meshd-config\nconfigMap: {{name: {}}}\n",
            quoted(&config_map)
        )),
        yaml(&format!("name: spire-agent-socket\n{socket}\n")),
    ];
    Some(PodAdditions {
        init_containers,
        volumes,
    })
}

/// A value as a quoted scalar (JSON strings are YAML), so no text can change the shape.
fn quoted(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A YAML literal of this module; they are fixed text with values quoted as JSON strings.
fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests;
