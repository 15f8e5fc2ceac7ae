//! The go-spiffe v2 peer (`tests/peers/gospiffe`, a small Go program) for interop tests.
//!
//! [`peer_bin`] builds it once with `go build` into `$MESHD_CACHE/bin` (default
//! `~/.cache/meshd/bin`) under a name holding a hash of its sources, so an edit rebuilds it
//! and later runs on the same machine reuse it (Go is needed only for that build).
//! [`GoServer::start`] runs `gospiffe-peer server` on a free loopback port and waits for its
//! ready line; [`client`] runs `gospiffe-peer client` to completion. Both can run as another
//! uid (through setpriv, from a copy of the binary in the test's folder) so SPIRE's unix
//! attestor gives them the identity registered for that uid.
#![allow(dead_code)]

use super::meshd::{free_port, Proc};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

/// The peer's source folder.
fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/gospiffe")
}

/// The built peer, `…/bin/gospiffe-peer-<hash of go.mod, go.sum, *.go>`; built on first use
/// (once per test process; a build by another process is renamed into place atomically).
pub fn peer_bin() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = built.as_ref() {
        return bin.clone();
    }
    let cache = std::env::var_os("MESHD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/meshd")
        })
        .join("bin");
    let bin = cache.join(format!("gospiffe-peer-{:016x}", sources_hash()));
    if !bin.is_file() {
        build(&bin);
    }
    *built = Some(bin.clone());
    bin
}

/// FNV-1a over the names and contents of the peer's sources (stable across Rust releases).
fn sources_hash() -> u64 {
    let mut files: Vec<PathBuf> = std::fs::read_dir(peer_dir())
        .expect("read tests/peers/gospiffe")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name == "go.mod" || name == "go.sum" || name.ends_with(".go")
        })
        .collect();
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in files {
        let name = file.file_name().unwrap().as_encoded_bytes().to_vec();
        let body = std::fs::read(&file).expect("read a peer source");
        for byte in name.iter().chain(&[0]).chain(&body).chain(&[0]) {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// `go build -o bin`, through a temporary name; fails the test naming `go` when it is missing.
fn build(bin: &Path) {
    let dir = bin.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let tmp = dir.join(format!(".gospiffe-peer.{}.tmp", std::process::id()));
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(peer_dir())
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "`go` is missing ({e}): the go-spiffe peer (tests/peers/gospiffe) is built with \
                 Go 1.24+ at test time; install Go (tests/run.sh needs it for grpcurl too)"
            )
        });
    assert!(
        out.status.success(),
        "go build of tests/peers/gospiffe failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, bin).unwrap_or_else(|e| panic!("rename to {}: {e}", bin.display()));
}

/// The peer as a command, run as `uid` through setpriv when given. For another uid the
/// binary is copied into `dir` (made world-readable): the cache may sit under /root.
fn command(dir: &Path, uid: Option<u32>) -> Command {
    let bin = peer_bin();
    let Some(uid) = uid else {
        return Command::new(bin);
    };
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let copy = dir.join("gospiffe-peer-for-uid");
    if !copy.exists() {
        std::fs::copy(&bin, &copy).expect("copy the gospiffe peer");
        let _ = std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755));
    }
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".to_string(),
    ])
    .arg(copy);
    cmd
}

/// `gospiffe-peer server`: an mTLS port (HTTP/2: gRPC health, or an HTTP answer naming both
/// IDs) that only `allow` may call.
pub struct GoServer {
    pub proc: Proc,
    /// `127.0.0.1:PORT`, where it listens.
    pub addr: String,
}

impl GoServer {
    /// Starts the server with its SVID from the Workload API at `socket`; returns once it
    /// listens (it has its SVID by then).
    pub fn start(name: &str, dir: &Path, socket: &str, allow: &str, uid: Option<u32>) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = command(dir, uid);
        cmd.args([
            "server", "-socket", socket, "-listen", &addr, "-allow", allow,
        ]);
        cmd.env_remove("SPIFFE_ENDPOINT_SOCKET");
        let proc = Proc::spawn(name, cmd, Some("gospiffe-peer server ready"));
        GoServer { proc, addr }
    }

    /// Waits (up to 10 s) until the server has printed `text` (e.g. a refused handshake).
    pub fn printed(&self, text: &str) -> bool {
        self.proc.wait_output(text, Duration::from_secs(10))
    }
}

/// What one `gospiffe-peer client` run printed.
#[derive(Debug)]
pub struct ClientRun {
    pub status: ExitStatus,
    /// stdout then stderr.
    pub text: String,
}

impl ClientRun {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// Runs `gospiffe-peer client -socket SOCKET -addr ADDR -server-id SERVER_ID EXTRA…` to the
/// end (it gives up by itself after 30 s). Without `-method` in `extra` it calls Health/Check.
pub fn client(
    dir: &Path,
    socket: &str,
    addr: &str,
    server_id: &str,
    uid: Option<u32>,
    extra: &[&str],
) -> ClientRun {
    let mut cmd = command(dir, uid);
    cmd.args([
        "client",
        "-socket",
        socket,
        "-addr",
        addr,
        "-server-id",
        server_id,
    ])
    .args(extra)
    .env_remove("SPIFFE_ENDPOINT_SOCKET")
    .stdin(std::process::Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the gospiffe client: {e}"));
    ClientRun {
        status: out.status,
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
