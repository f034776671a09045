//! A real etcd server for tests: started on free 127.0.0.1 ports with a temporary data
//! directory, killed (and its directory removed) on drop. Never a mock.
//!
//! Include it with a path module from any test crate of the workspace:
//!
//! ```ignore
//! #[path = "../../tests/support/etcd.rs"] // from coordinator/tests/
//! mod etcd; // or #[path = "support/etcd.rs"] from the root tests/
//! let etcd = etcd::Etcd::start();
//! // etcd.url() is "http://127.0.0.1:PORT", for --etcd or EtcdConfig::endpoints
//! ```
//!
//! The binary is `$ETCD_BIN`, else `etcd` on PATH, else `/usr/bin/etcd`. Without one the
//! test fails (it never skips), saying to run `.ci/run` or `apt-get install -y etcd-server`.
//! Needs only std and `tempfile` (a dev-dependency of every crate that uses it).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd gets to answer its health check.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running etcd, killed on drop.
pub struct Etcd {
    child: Child,
    url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it reports healthy. Panics, naming the fix, when the
    /// binary is missing or the server does not come up.
    pub fn start() -> Etcd {
        let bin = etcd_bin();
        // A port picked here can be taken by someone else before etcd binds it; then etcd
        // exits at once and another pair is tried.
        let mut last_failure = String::new();
        for _ in 0..3 {
            match try_start(&bin) {
                Ok(etcd) => return etcd,
                Err(e) => last_failure = e,
            }
        }
        panic!("etcd ({}) did not start: {last_failure}", bin.display());
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `host:port` of the client URL.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Where etcd's own log goes (worth reading when a test fails).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Kills etcd now (as `kill -9` would), keeping its data directory.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Fields drop after this: the data directory goes once etcd is dead.
        self.kill();
    }
}

fn etcd_bin() -> PathBuf {
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("etcd"))
                .find(|p| p.is_file())
        })
    };
    let bin = std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .or_else(on_path)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    assert!(
        bin.is_file(),
        "etcd is not installed (looked for $ETCD_BIN, etcd on PATH, /usr/bin/etcd): these tests \
         need a real etcd server; run .ci/run, or `apt-get install -y etcd-server`"
    );
    bin
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    l.local_addr().expect("local addr").port()
}

fn try_start(bin: &Path) -> Result<Etcd, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = dir.path().join("etcd.log");
    let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(bin)
        .arg("--name=default")
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=default={peer_url}"))
        .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
    let mut etcd = Etcd {
        child,
        url,
        log,
        dir,
    };
    let started = Instant::now();
    while started.elapsed() < READY_WITHIN {
        if let Ok(Some(status)) = etcd.child.try_wait() {
            let log = std::fs::read_to_string(&etcd.log).unwrap_or_default();
            let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
            return Err(format!(
                "exited with {status}; last lines of its log:\n{tail}"
            ));
        }
        if healthy(client) {
            return Ok(etcd);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "not healthy within {READY_WITHIN:?}; see {}",
        etcd.log.display()
    ))
}

/// `GET /health` on the client port answers `{"health":"true"}` once etcd serves.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}
