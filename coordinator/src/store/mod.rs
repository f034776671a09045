//! The coordinator's durable state: jobs, the checkpoint index, worker leases, id counters
//! and the leader lease, behind one [`Store`] trait.
//!
//! # Layout
//! - this file: the [`Store`] trait, [`StoreError`], [`Leadership`], and the pure parts
//!   (the key layout in [`Keys`], [`parse_endpoints`]);
//! - [`memory`]: [`MemoryStore`], for `ringtrain local` and a coordinator without `--etcd`
//!   (nothing survives the process; it always leads);
//! - [`etcd`]: [`EtcdStore`], etcd v3 through `etcd-client`: a leader lease with fencing,
//!   so two coordinators on one prefix never both write.
//!
//! Records are opaque JSON text owned by the caller; the store only places and fences them.
//!
//! # Fencing
//! Every write of an [`EtcdStore`] is one etcd transaction that first compares the leader
//! key with what this coordinator wrote when it won (its id and the key's create revision).
//! A coordinator that lost the lease, even one paused for longer than the TTL that does not
//! know it yet, has its writes refused with [`StoreError::Fenced`], and its
//! [`Leadership::lost`] token fires.

pub mod etcd;
pub mod memory;

pub use etcd::{EtcdConfig, EtcdStore};
pub use memory::MemoryStore;

use tokio_util::sync::CancellationToken;

/// A boxed future borrowing the store (the trait is object-safe: `Arc<dyn Store>`).
pub type BoxFuture<'a, T> = futures::future::BoxFuture<'a, T>;

/// What a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or answered with an error.
    #[error("etcd at {endpoints}: {message}")]
    Unavailable {
        /// The configured endpoints, comma-separated.
        endpoints: String,
        /// What failed and what to check.
        message: String,
    },
    /// A write was refused because another coordinator holds the leader lease now.
    #[error(
        "this coordinator no longer holds the leader lease; a newer leader refused its write of {key}"
    )]
    Fenced {
        /// The key (under the prefix) the refused write was for.
        key: String,
    },
    /// A record in the store cannot be read.
    #[error("store record {key}: {message}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The store's configuration is invalid (an endpoint list, a TTL, a prefix).
    #[error("{field}: {message}")]
    Config {
        /// The option or field at fault (`--etcd`, `leader_ttl`).
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// Leadership of one coordinator, from [`Store::campaign`].
#[derive(Debug, Clone)]
pub struct Leadership {
    /// Increases with every election on the prefix (etcd: the leader key's create
    /// revision; memory: 1).
    pub term: u64,
    /// Cancelled when the lease is lost (expired, revoked, or another leader elected).
    pub lost: CancellationToken,
}

/// The coordinator's durable state. See the module docs for fencing.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// A short description for logs ("memory", "etcd http://127.0.0.1:2379 prefix /ringtrain").
    fn describe(&self) -> String;

    /// Waits until this coordinator (`id`) holds the leader lease, or `shutdown` fires
    /// (then `Ok(None)`). Memory: at once, term 1.
    fn campaign(
        &self,
        id: &str,
        shutdown: CancellationToken,
    ) -> BoxFuture<'_, Result<Option<Leadership>, StoreError>>;

    /// The id of the coordinator holding the leader lease now, if any (a standby names it
    /// in its UNAVAILABLE answers).
    fn leader(&self) -> BoxFuture<'_, Result<Option<String>, StoreError>>;

    /// Writes (replaces) a job record: opaque JSON text owned by the caller. Fenced.
    fn put_job(&self, job_id: &str, record_json: String) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Every job record, `(job_id, json)`, in key order.
    fn jobs(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>>;

    /// Records that a checkpoint of `job_id` at `step` was stored (opaque JSON: path,
    /// step, generation, hash). Fenced.
    fn put_checkpoint(
        &self,
        job_id: &str,
        step: u64,
        entry_json: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The job's checkpoint index, `(step, json)`, ascending.
    fn checkpoints(&self, job_id: &str) -> BoxFuture<'_, Result<Vec<(u64, String)>, StoreError>>;

    /// A worker's lease: the record lives while this store keeps the lease alive (a
    /// background task owned by the store, until [`Store::drop_worker`], [`Store::close`]
    /// or the store is dropped; then it expires after the worker TTL). Writing it again
    /// replaces the record and keeps the lease. Fenced.
    fn put_worker(
        &self,
        worker_id: &str,
        record_json: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Ends a worker's lease and removes its record. Fenced (the local lease is ended
    /// even when the removal is refused).
    fn drop_worker(&self, worker_id: &str) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Live worker records, `(worker_id, json)`, in key order.
    fn workers(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>>;

    /// A monotonically increasing counter (job numbers, worker numbers), fenced; returns
    /// the new value (the first is 1).
    fn next_id(&self, name: &str) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Graceful end: stops the keep-alive tasks and revokes this store's leases, so a
    /// standby takes over at once instead of after the TTL. Dropping the store without
    /// closing it behaves like a crash (the leases expire). A closed store is spent: it
    /// no longer campaigns or writes.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// The key layout under a prefix (pure, so it is tested without etcd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (no trailing slash: `/ringtrain`).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// `<prefix>/leader`: the current leader's id, attached to its lease.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// `<prefix>/jobs/`: where job records live.
    pub fn jobs(&self) -> String {
        format!("{}/jobs/", self.prefix)
    }

    /// `<prefix>/jobs/<job_id>`.
    pub fn job(&self, job_id: &str) -> String {
        format!("{}{job_id}", self.jobs())
    }

    /// `<prefix>/checkpoints/<job_id>/`: a job's checkpoint index.
    pub fn checkpoints(&self, job_id: &str) -> String {
        format!("{}/checkpoints/{job_id}/", self.prefix)
    }

    /// `<prefix>/checkpoints/<job_id>/<step:020>`: zero-padded so key order is step order.
    pub fn checkpoint(&self, job_id: &str, step: u64) -> String {
        format!("{}{step:020}", self.checkpoints(job_id))
    }

    /// `<prefix>/workers/`: worker lease records.
    pub fn workers(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    /// `<prefix>/workers/<worker_id>`.
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}{worker_id}", self.workers())
    }

    /// `<prefix>/ids/<name>`: a counter.
    pub fn id(&self, name: &str) -> String {
        format!("{}/ids/{name}", self.prefix)
    }

    /// The step of a checkpoint key under `checkpoints(job_id)`.
    pub fn step_of(&self, job_id: &str, key: &str) -> Result<u64, StoreError> {
        key.strip_prefix(&self.checkpoints(job_id))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| StoreError::Corrupt {
                key: key.to_string(),
                message: format!(
                    "expected {}<step> with a 20-digit step; remove the key or fix its name",
                    self.checkpoints(job_id)
                ),
            })
    }
}

/// Parses `URL[,URL…]` (`http://host:port` or `host:port`) into endpoint URLs.
pub fn parse_endpoints(s: &str) -> Result<Vec<String>, StoreError> {
    let bad = |message: String| StoreError::Config {
        field: "--etcd".to_string(),
        message,
    };
    let mut endpoints = Vec::new();
    for (i, raw) in s.split(',').map(str::trim).enumerate() {
        if raw.is_empty() {
            return Err(bad(format!(
                "endpoint {} of {s:?} is empty (expected URL[,URL…] such as http://127.0.0.1:2379)",
                i + 1
            )));
        }
        let authority = if let Some(rest) = raw.strip_prefix("http://") {
            rest
        } else if raw.starts_with("https://") {
            return Err(bad(format!(
                "{raw}: https is not supported (this build has no TLS for etcd); use http:// on a private network"
            )));
        } else if raw.contains("://") {
            return Err(bad(format!(
                "{raw}: unknown scheme (expected http://host:port or host:port)"
            )));
        } else {
            raw
        };
        let authority = authority.trim_end_matches('/');
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| {
            bad(format!(
                "{raw}: no port (expected http://host:port or host:port, e.g. 127.0.0.1:2379)"
            ))
        })?;
        if host.is_empty() || host.contains('/') {
            return Err(bad(format!(
                "{raw}: no host (expected http://host:port or host:port, e.g. 127.0.0.1:2379)"
            )));
        }
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad(format!(
                "{raw}: port {port:?} is not a number from 1 to 65535"
            )));
        }
        endpoints.push(format!("http://{host}:{port}"));
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_accept_urls_and_bare_authorities() {
        assert_eq!(
            parse_endpoints("http://127.0.0.1:2379, etcd-1:2379,http://[::1]:2380/").unwrap(),
            vec![
                "http://127.0.0.1:2379",
                "http://etcd-1:2379",
                "http://[::1]:2380"
            ]
        );
    }

    #[test]
    fn endpoints_reject_what_cannot_be_dialled() {
        for (input, expect) in [
            ("", "endpoint 1 of \"\" is empty"),
            ("a:1,", "endpoint 2"),
            ("localhost", "no port"),
            (":2379", "no host"),
            ("h:0", "not a number from 1 to 65535"),
            ("h:port", "not a number"),
            ("https://h:2379", "https is not supported"),
            ("grpc://h:2379", "unknown scheme"),
        ] {
            let e = parse_endpoints(input).unwrap_err().to_string();
            assert!(e.starts_with("--etcd: "), "{input:?}: {e}");
            assert!(e.contains(expect), "{input:?}: {e}");
        }
    }

    #[test]
    fn checkpoint_keys_sort_by_step_and_parse_back() {
        let k = Keys::new("/rt/");
        assert_eq!(k.leader(), "/rt/leader");
        assert_eq!(k.job("j1"), "/rt/jobs/j1");
        assert_eq!(k.worker("w"), "/rt/workers/w");
        assert_eq!(k.id("job"), "/rt/ids/job");
        let a = k.checkpoint("j", 9);
        let b = k.checkpoint("j", 10);
        assert_eq!(a, "/rt/checkpoints/j/00000000000000000009");
        assert!(a < b);
        assert_eq!(k.step_of("j", &b).unwrap(), 10);
        assert!(matches!(
            k.step_of("j", "/rt/checkpoints/j/x"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
