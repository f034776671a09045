//! The `/metrics` endpoint of `serve` and `worker` (`--metrics-listen`): a minimal
//! HTTP/1.1 responder on tokio, enough for Prometheus, curl and Kubernetes probes.
//!
//! One request per connection (`Connection: close`): a scrape every few seconds gains
//! nothing from keep-alive, and a responder that never reuses a connection has no
//! pipelining or body framing to get wrong. `GET` and `HEAD` of `/metrics` (any query
//! string) answer the page; other paths are 404, other methods 405. Every connection has
//! a deadline and their number is capped, so a slow or hostile client cannot hold the
//! process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ringtrain_core::metrics::CONTENT_TYPE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// The flag and its variable, as errors name them.
const FLAG: &str = "--metrics-listen (RINGTRAIN_METRICS_LISTEN)";
/// Largest request head read; a longer one is answered 431.
const MAX_HEAD: usize = 8 << 10;
/// Connections served at once; more are closed unanswered until one ends.
const MAX_CONNECTIONS: usize = 32;
/// Longest one connection may take, from accept to the last byte written.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Renders the metrics page; called once per scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds the metrics listener, with an error that names the flag and the fix.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "{FLAG}: cannot listen on {addr:?} (expected HOST:PORT of this host, e.g. 0.0.0.0:9090, with the port free); choose another address, or leave the flag unset to serve no metrics"
        )
    })
}

/// Serves `render`'s page on `listener` until `shutdown` is cancelled, then waits up to
/// [`SHUTDOWN_GRACE`] for the connections in flight.
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("metrics listener: too many connections; closing one unanswered");
            continue;
        };
        let render = render.clone();
        connections.spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CONNECTION_DEADLINE, answer(stream, &render)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "metrics connection failed"),
                Err(_) => debug!("metrics connection timed out"),
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connections.wait()).await;
}

/// Reads one request head from `stream` and writes the response.
async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let response = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // closed before a whole head arrived: nothing to answer
        }
        head.extend_from_slice(&chunk[..n]);
        if head_end(&head).is_some() {
            break respond(&head, || render());
        }
        if head.len() > MAX_HEAD {
            break plain(
                431,
                "Request Header Fields Too Large",
                "request head too large\n",
            );
        }
    };
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Where the request head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// The response to a complete request head (pure: tested without sockets).
fn respond(head: &[u8], render: impl FnOnce() -> String) -> Vec<u8> {
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .map(|l| {
            String::from_utf8_lossy(l)
                .trim_end_matches('\r')
                .to_string()
        })
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return plain(400, "Bad Request", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return plain(
            505,
            "HTTP Version Not Supported",
            "only HTTP/1.x is served\n",
        );
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return plain(
            404,
            "Not Found",
            "not found: metrics are served at /metrics\n",
        );
    }
    match method {
        "GET" | "HEAD" => {
            let body = render();
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if method == "GET" {
                out.extend_from_slice(body.as_bytes());
            }
            out
        }
        _ => {
            let mut r = plain(
                405,
                "Method Not Allowed",
                "only GET and HEAD are served at /metrics\n",
            );
            // The Allow header is required with 405; insert it after the status line.
            let at = r.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
            r.splice(at..at, b"Allow: GET, HEAD\r\n".iter().copied());
            r
        }
    }
}

/// A plain-text response with `status` and `body`.
fn plain(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: Vec<u8>) -> String {
        String::from_utf8(r).unwrap()
    }

    #[test]
    fn get_metrics_answers_the_page_in_the_prometheus_content_type() {
        let r = text(respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || {
            "a 1\n".into()
        }));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{r}"
        );
        assert!(r.contains("\r\nContent-Length: 4\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\na 1\n"), "{r}");
        // A query string is ignored; HEAD has the length but no body.
        let r = text(respond(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n", || {
            "a 1\n".into()
        }));
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
    }

    #[test]
    fn other_paths_methods_and_garbage_are_refused() {
        let never = || -> String { panic!("rendered for a refused request") };
        let r = text(respond(b"GET / HTTP/1.1\r\n\r\n", never));
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        let r = text(respond(b"GET /metricsx HTTP/1.1\r\n\r\n", never));
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let r = text(respond(b"POST /metrics HTTP/1.1\r\n\r\n", never));
        assert!(
            r.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\n"),
            "{r}"
        );
        let r = text(respond(b"hello\r\n\r\n", never));
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let r = text(respond(b"GET /metrics SPDY/3\r\n\r\n", never));
        assert!(r.starts_with("HTTP/1.1 505 "), "{r}");
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[tokio::test]
    async fn a_bind_failure_names_the_flag() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = format!("{:#}", bind(&addr).await.unwrap_err());
        assert!(
            e.contains("--metrics-listen (RINGTRAIN_METRICS_LISTEN)"),
            "{e}"
        );
        assert!(e.contains(&addr), "{e}");
        let e = format!("{:#}", bind("not an address").await.unwrap_err());
        assert!(e.contains("--metrics-listen"), "{e}");
    }

    #[tokio::test]
    async fn a_real_connection_gets_the_page_and_shutdown_stops_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(|| "ringtrain_x 1\n".to_string()),
            stop.clone(),
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The head arrives in two writes: the responder waits for the blank line.
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        s.write_all(b"Host: test\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nringtrain_x 1\n"), "{out}");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
