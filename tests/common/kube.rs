//! A real Kubernetes API server for tests, no cluster: etcd and kube-apiserver (v1.34.2,
//! built once by `tests/tools/build-kube.sh` into the cache) started on free loopback ports
//! in a temporary folder, with a self-signed serving certificate (openssl), a static token
//! for an admin in `system:masters`, service account keys, RBAC and the admission plugins a
//! cluster has (MutatingAdmissionWebhook among them). `KubeApi::start` waits for `/readyz`;
//! `api` calls the REST API with curl and the token. Opt-in, `start_controller_manager` adds
//! kube-controller-manager (the deployment, replicaset and garbage collector controllers, as
//! the admin) so Deployments get ReplicaSets and Pod objects; no scheduler or kubelet, so the
//! pods are never scheduled. Every process stops (by PID) on drop.
#![allow(dead_code)]

use super::meshd::{free_port, http, wait_until, Proc};
use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The Kubernetes release the script builds (and its cache folder's name).
pub const KUBE_VERSION: &str = "v1.34.2";

/// The folder with `etcd`, `kube-apiserver` (and `kube-controller-manager`): `$MESHD_KUBE_BIN`, else
/// `$MESHD_CACHE/kube-v1.34.2/bin` (cache default `~/.cache/meshd`). Panics, naming the
/// script that builds them, when either is missing: these tests never skip.
pub fn kube_bin() -> PathBuf {
    let dir = match std::env::var_os("MESHD_KUBE_BIN") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("MESHD_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/meshd")
                });
            cache.join(format!("kube-{KUBE_VERSION}/bin"))
        }
    };
    for bin in ["etcd", "kube-apiserver"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: run tests/tools/build-kube.sh (once, 15-25 minutes; tests/run.sh \
             does it when the binaries are missing)",
            dir.join(bin).display()
        );
    }
    dir
}

/// etcd and kube-apiserver on loopback (and kube-controller-manager when asked), and how to
/// call the API server.
pub struct KubeApi {
    /// `start_controller_manager`'s; declared first so it stops before its API server.
    pub controller_manager: Option<Proc>,
    /// Declared before etcd so it stops first.
    pub apiserver: Proc,
    pub etcd: Proc,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The admin's bearer token (user `admin`, group `system:masters`).
    pub token: String,
    /// The serving certificate, which curl trusts.
    pub ca: PathBuf,
    /// Certificates, keys, token file and etcd's data; removed last.
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl) is needed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl KubeApi {
    /// Starts etcd, then kube-apiserver, and waits until `/readyz` answers 200.
    pub fn start() -> KubeApi {
        let bin = kube_bin();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "serving.key",
                "-out",
                "serving.crt",
                "-days",
                "2",
                "-subj",
                "/CN=kube-apiserver",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
        );
        openssl(d, &["genrsa", "-out", "sa.key", "2048"]);
        openssl(d, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        let token = format!("meshd-test-{}", std::process::id());
        std::fs::write(
            d.join("tokens.csv"),
            format!("{token},admin,admin-uid,\"system:masters\"\n"),
        )
        .unwrap();

        let (client, peer) = (free_port(), free_port());
        let mut cmd = Command::new(bin.join("etcd"));
        cmd.args([
            "--name=meshd-test".to_string(),
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=meshd-test=http://127.0.0.1:{peer}"),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ]);
        let mut etcd = Proc::spawn("etcd", cmd, None);
        let etcd_addr: SocketAddr = format!("127.0.0.1:{client}").parse().unwrap();
        let up = wait_until(Duration::from_secs(30), || {
            http(etcd_addr, "GET", "/health").is_some_and(|(c, b)| c == 200 && b.contains("true"))
        });
        if !up {
            let exited = etcd.child.try_wait().ok().flatten();
            panic!(
                "etcd not healthy in 30 s (exit: {exited:?}):\n{}",
                etcd.dump()
            );
        }

        let port = free_port();
        let p = |f: &str| d.join(f).display().to_string();
        let mut cmd = Command::new(bin.join("kube-apiserver"));
        cmd.args([
            format!("--etcd-servers=http://127.0.0.1:{client}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("serving.crt")),
            format!("--tls-private-key-file={}", p("serving.key")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".to_string(),
            "--authorization-mode=Node,RBAC".to_string(),
            "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,\
             DefaultStorageClass,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,\
             ResourceQuota"
                .to_string(),
            // The CSI driver's DaemonSet runs privileged, as in a cluster.
            "--allow-privileged=true".to_string(),
            // No kubelets or nodes: the `kubernetes` Service's endpoint would be loopback.
            "--endpoint-reconciler-type=none".to_string(),
            "--profiling=false".to_string(),
        ]);
        let apiserver = Proc::spawn("kube-apiserver", cmd, None);
        let mut api = KubeApi {
            controller_manager: None,
            apiserver,
            etcd,
            url: format!("https://127.0.0.1:{port}"),
            token,
            ca: d.join("serving.crt"),
            dir,
        };
        let ready = wait_until(Duration::from_secs(180), || {
            api.api("GET", "/readyz", None).0 == 200
        });
        if !ready {
            let exited = api.apiserver.child.try_wait().ok().flatten();
            let log = api.apiserver.dump();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "kube-apiserver not ready in 180 s (exit: {exited:?}); /readyz?verbose: {:?}\n{}",
                api.api("GET", "/readyz?verbose", None),
                tail.join("\n")
            );
        }
        api
    }

    /// Starts kube-controller-manager against this API server, as the admin (a kubeconfig
    /// with the token and the CA), with only the controllers that turn a Deployment into Pod
    /// objects and clean up after a delete (deployment, replicaset, garbagecollector), and
    /// waits until its `/healthz` answers 200. Stopped on drop, before the API server.
    pub fn start_controller_manager(&mut self) {
        let d = self.dir.path();
        let kubeconfig = d.join("controller-manager.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    \
                 server: {}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    \
                 token: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    \
                 user: admin\ncurrent-context: test\n",
                self.url,
                self.ca.display(),
                self.token
            ),
        )
        .unwrap();
        let port = free_port();
        let kc = kubeconfig.display().to_string();
        let bin = kube_bin().join("kube-controller-manager");
        assert!(
            bin.is_file(),
            "{} is missing: run tests/tools/build-kube.sh (it builds what is missing; tests/run.sh \
             runs it)",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        cmd.args([
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--controllers=deployment,replicaset,garbagecollector".to_string(),
            "--use-service-account-credentials=false".to_string(),
            "--leader-elect=false".to_string(),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d.join("controller-manager").display()),
            "--profiling=false".to_string(),
        ]);
        let mut proc = Proc::spawn("kube-controller-manager", cmd, None);
        let healthy = wait_until(Duration::from_secs(120), || {
            Command::new("curl")
                .args(["-sfk", "--max-time", "5"])
                .arg(format!("https://127.0.0.1:{port}/healthz"))
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !healthy {
            let exited = proc.child.try_wait().ok().flatten();
            let log = proc.dump();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "kube-controller-manager not healthy in 120 s (exit: {exited:?}):\n{}",
                tail.join("\n")
            );
        }
        self.controller_manager = Some(proc);
    }

    /// One REST call as the admin: the status (0 when curl could not connect) and the body
    /// as JSON (a string value when it is not JSON, e.g. `/readyz`'s `ok`).
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "-X", method, "--cacert"])
            .arg(&self.ca)
            .args(["-H", &format!("Authorization: Bearer {}", self.token)])
            .args(["-H", "Accept: application/json", "-w", "\n%{http_code}"]);
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.arg(format!("{}{path}", self.url))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("curl (Debian package curl) is needed");
        {
            let mut stdin = child.stdin.take().unwrap();
            if let Some(b) = body {
                stdin.write_all(b.to_string().as_bytes()).unwrap();
            }
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().unwrap_or(0);
        let json = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into()));
        (code, json)
    }

    /// The REST collection path of an object (`apiVersion`, `kind`, `metadata.namespace`,
    /// default `default`), by the server's discovery of that group version.
    pub fn collection(&self, object: &Value) -> String {
        let api_version = object["apiVersion"].as_str().expect("apiVersion");
        let kind = object["kind"].as_str().expect("kind");
        let base = if api_version.contains('/') {
            format!("/apis/{api_version}")
        } else {
            format!("/api/{api_version}")
        };
        let (code, list) = self.api("GET", &base, None);
        assert_eq!(code, 200, "discovery of {base}: {list}");
        let resource = list["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["kind"] == kind && !r["name"].as_str().unwrap_or("/").contains('/'))
            .unwrap_or_else(|| panic!("the API server has no {kind} in {api_version}"));
        let plural = resource["name"].as_str().unwrap();
        if resource["namespaced"] == true {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default");
            format!("{base}/namespaces/{ns}/{plural}")
        } else {
            format!("{base}/{plural}")
        }
    }
}

/// The documents of a YAML stream as JSON (empty documents left out).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML as JSON"))
        .collect()
}
