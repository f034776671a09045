//! [`EtcdStore`]: the [`Store`] in etcd v3, with a leader lease and fenced writes.
//!
//! Keys under the prefix (see [`Keys`]): `leader` (the leader's id, attached to its lease,
//! created only when absent), `jobs/<id>`, `checkpoints/<job>/<step:020>`,
//! `workers/<id>` (attached to a per-worker lease) and `ids/<name>`.
//!
//! The campaign grants a lease and tries a create-only transaction on the leader key;
//! while another coordinator holds it, it watches the key (and retries at least every
//! quarter TTL) and tries again once the key is gone. The winner's lease is kept alive
//! every third of the TTL by a task the store owns; when a keep-alive says the lease is
//! gone, or no keep-alive succeeded within the TTL, [`Leadership::lost`] fires. Every
//! write compares the leader key's value and create revision with what this store wrote,
//! so a stale leader's writes are refused with [`StoreError::Fenced`].
//!
//! A takeover after the leader dies without closing its store (`kill -9`) therefore takes
//! the TTL plus etcd's expiry sweep (about half a second) plus the watch event; after
//! [`Store::close`] it is immediate.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use futures::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{BoxFuture, Keys, Leadership, Store, StoreError};

/// The shortest lease etcd honours with its default election timeout (it raises shorter
/// TTLs to its minimum), so shorter ones would not mean what they say.
const MIN_TTL: Duration = Duration::from_secs(2);

/// How often `next_id` retries when another write of the same counter came in between.
const NEXT_ID_ATTEMPTS: usize = 16;

/// How long [`Store::close`] waits for the keep-alive tasks to end.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, `http://host:port` (see [`super::parse_endpoints`]).
    pub endpoints: Vec<String>,
    /// Key prefix shared by the coordinators of one cluster (default `/ringtrain`).
    pub prefix: String,
    /// TTL of the leader lease (default 5 s; at least 2 s, whole seconds): a standby takes
    /// over within about this long after the leader dies.
    pub leader_ttl: Duration,
    /// TTL of each worker's lease (default 10 s, at least 2 s, whole seconds).
    pub worker_ttl: Duration,
    /// Deadline of connecting and of every single etcd request (default 3 s).
    pub connect_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: "/ringtrain".to_string(),
            leader_ttl: Duration::from_secs(5),
            worker_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

impl EtcdConfig {
    /// The defaults with these endpoints.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            ..EtcdConfig::default()
        }
    }

    /// Checks every field; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |field: &str, message: String| StoreError::Config {
            field: field.to_string(),
            message,
        };
        if self.endpoints.is_empty() {
            return Err(bad(
                "--etcd",
                "no endpoints (expected URL[,URL…] such as http://127.0.0.1:2379)".into(),
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(bad(
                "--etcd-prefix",
                format!(
                    "{:?} must start with '/' and not end with one (e.g. /ringtrain)",
                    self.prefix
                ),
            ));
        }
        for (field, ttl) in [
            ("leader_ttl (--leader-ttl-secs)", self.leader_ttl),
            ("worker_ttl", self.worker_ttl),
        ] {
            if ttl < MIN_TTL || ttl.subsec_nanos() != 0 {
                return Err(bad(
                    field,
                    format!(
                        "{ttl:?} is not a whole number of seconds of at least {MIN_TTL:?} (etcd raises shorter leases to its minimum)"
                    ),
                ));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(bad("connect_timeout", "must be more than zero".into()));
        }
        Ok(())
    }
}

/// What this store wrote when it won the leader lease: the fencing token of its writes.
#[derive(Debug, Clone)]
struct Held {
    id: String,
    lease: i64,
    create_revision: i64,
    lost: CancellationToken,
}

/// A worker's lease, kept alive by a task until `stop` fires.
#[derive(Debug)]
struct WorkerLease {
    lease: i64,
    /// Cancelled by `drop_worker`/`close`, or by the keep-alive task when the lease is gone.
    stop: CancellationToken,
}

/// The [`Store`] in etcd v3. Dropping it stops its keep-alive tasks without revoking the
/// leases (as a crash would); [`Store::close`] revokes them.
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
    keys: Keys,
    /// `std::sync::Mutex`: read or replaced in short sections, never held across `.await`.
    held: Mutex<Option<Held>>,
    /// Held across the etcd calls of one worker operation, so two operations on worker
    /// leases never race to grant two leases for one worker.
    workers: tokio::sync::Mutex<HashMap<String, WorkerLease>>,
    /// Parent of every keep-alive task's token; cancelled on drop and close.
    root: CancellationToken,
    tasks: TaskTracker,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("config", &self.config)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

/// Why a keep-alive loop ended.
enum LeaseEnd {
    /// The owner stopped it.
    Stopped,
    /// etcd says the lease is gone (expired or revoked).
    Gone,
    /// No keep-alive succeeded within the TTL: the lease may have expired.
    Silent,
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers within `config.connect_timeout`.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        config.validate()?;
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(config.connect_timeout, config.connect_timeout);
        let endpoints = config.endpoints.join(",");
        let unreachable = |e: String| {
            StoreError::Unavailable {
            endpoints: endpoints.clone(),
            message: format!(
                "cannot connect: {e}; check that etcd runs and that --etcd names its client URL (--advertise-client-urls)"
            ),
        }
        };
        let client = match tokio::time::timeout(
            config.connect_timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {:?}",
                    config.connect_timeout
                )))
            }
        };
        let store = EtcdStore {
            client,
            keys: Keys::new(&config.prefix),
            config,
            held: Mutex::new(None),
            workers: tokio::sync::Mutex::new(HashMap::new()),
            root: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        // The client connects lazily: one read proves etcd answers.
        match store.leader_now().await {
            Ok(_) => {}
            Err(StoreError::Unavailable { message, .. }) => return Err(unreachable(message)),
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    /// The key layout of this store.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn endpoints(&self) -> String {
        self.config.endpoints.join(",")
    }

    fn held(&self) -> MutexGuard<'_, Option<Held>> {
        // The guarded value is a plain Option replaced whole; a panic elsewhere cannot
        // leave it half-written, so a poisoned lock is used as is.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this store believes it leads (etcd has the last word: writes are fenced).
    fn holding(&self) -> bool {
        self.held().as_ref().is_some_and(|h| !h.lost.is_cancelled())
    }

    /// One etcd request under the per-request deadline.
    async fn call<T>(
        &self,
        what: impl FnOnce() -> String,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        deadline(
            self.config.connect_timeout,
            &self.endpoints(),
            what,
            request,
        )
        .await
    }

    async fn get(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let mut resp = self
            .call(|| format!("reading {key}"), kv.get(key, options))
            .await?;
        Ok(resp.take_kvs())
    }

    /// `(key without prefix, value)` of every key under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let kvs = self
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        kvs.iter()
            .map(|kv| {
                let (key, value) = text(kv)?;
                let name = key.strip_prefix(prefix).unwrap_or(&key).to_string();
                Ok((name, value))
            })
            .collect()
    }

    async fn leader_now(&self) -> Result<Option<String>, StoreError> {
        let kvs = self.get(&self.keys.leader(), None).await?;
        kvs.first().map(|kv| text(kv).map(|(_, v)| v)).transpose()
    }

    /// Runs `ops` in a transaction that first checks that this store still holds the
    /// leader key; a failed check fires `lost` and returns `Fenced`.
    async fn fenced(&self, key: &str, ops: Vec<TxnOp>) -> Result<TxnResponse, StoreError> {
        let fenced = || StoreError::Fenced {
            key: key.to_string(),
        };
        let Some(held) = self.held().clone() else {
            return Err(fenced());
        };
        if held.lost.is_cancelled() {
            return Err(fenced());
        }
        let leader = self.keys.leader();
        let txn = Txn::new()
            .when([
                Compare::value(leader.clone(), CompareOp::Equal, held.id.clone()),
                Compare::create_revision(leader, CompareOp::Equal, held.create_revision),
            ])
            .and_then(ops);
        let mut kv = self.client.kv_client();
        let resp = self.call(|| format!("writing {key}"), kv.txn(txn)).await?;
        if resp.succeeded() {
            Ok(resp)
        } else {
            warn!(key, id = %held.id, "a write was fenced: another coordinator holds the leader lease");
            held.lost.cancel();
            Err(fenced())
        }
    }

    /// A fenced put.
    async fn put_fenced(
        &self,
        key: &str,
        value: String,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        self.fenced(key, vec![TxnOp::put(key, value, options)])
            .await
            .map(drop)
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let mut lease = self.client.lease_client();
        let secs = ttl_secs(ttl);
        let resp = self
            .call(
                || format!("granting a {secs} s lease"),
                lease.grant(secs, None),
            )
            .await?;
        Ok(resp.id())
    }

    /// Revokes a lease, best effort (it expires anyway): a failure is logged.
    async fn revoke(&self, lease: i64) {
        let mut client = self.client.lease_client();
        if let Err(e) = self
            .call(|| format!("revoking lease {lease:x}"), client.revoke(lease))
            .await
        {
            // Revoking a lease that already expired answers "lease not found".
            if !e.to_string().contains("not found") {
                warn!(lease, error = %e, "could not revoke an etcd lease; it expires after its ttl");
            }
        }
    }

    /// Starts the task that keeps `lease` alive until `stop` fires or the lease is gone;
    /// `on_end` runs with the reason when it ends.
    fn spawn_keep_alive(
        &self,
        lease: i64,
        ttl: Duration,
        stop: CancellationToken,
        on_end: impl FnOnce(LeaseEnd) + Send + 'static,
    ) {
        let client = self.client.clone();
        let endpoints = self.endpoints();
        let request_timeout = self.config.connect_timeout;
        self.tasks.spawn(async move {
            let end = keep_alive(client, lease, ttl, request_timeout, &endpoints, stop).await;
            on_end(end);
        });
    }

    /// One attempt at the leader key: `Ok(Ok(held))` when won, else `Ok(Err(revision))`
    /// with the revision at which someone else held it.
    async fn try_lead(&self, id: &str) -> Result<Result<Held, i64>, StoreError> {
        let leader = self.keys.leader();
        let lease = self.grant(self.config.leader_ttl).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                leader.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                leader.clone(),
                id,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut kv = self.client.kv_client();
        let resp = match self
            .call(|| format!("creating {leader}"), kv.txn(txn))
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                self.revoke(lease).await;
                return Err(e);
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        if !resp.succeeded() {
            self.revoke(lease).await;
            return Ok(Err(revision));
        }
        let lost = self.root.child_token();
        let held = Held {
            id: id.to_string(),
            lease,
            // The put was the transaction's only write, so it created the key at the
            // transaction's revision.
            create_revision: revision,
            lost: lost.clone(),
        };
        let stop = lost.clone();
        let who = id.to_string();
        self.spawn_keep_alive(lease, self.config.leader_ttl, stop, move |end| {
            match end {
                LeaseEnd::Stopped => {}
                LeaseEnd::Gone => warn!(id = %who, "the leader lease expired or was revoked"),
                LeaseEnd::Silent => {
                    warn!(id = %who, "no keep-alive of the leader lease succeeded within its ttl")
                }
            }
            lost.cancel();
        });
        Ok(Ok(held))
    }

    /// Waits until the leader key is deleted after `revision`, for at most a quarter TTL
    /// (the watch can miss nothing, but a retry now and then also covers a broken watch).
    async fn wait_for_vacancy(&self, revision: i64, shutdown: &CancellationToken) {
        let poll = self.config.leader_ttl / 4;
        let watch = async {
            let mut client = self.client.watch_client();
            let options = WatchOptions::new().with_start_revision(revision + 1);
            let Ok(mut stream) = client.watch(self.keys.leader(), Some(options)).await else {
                return std::future::pending().await;
            };
            while let Ok(Some(resp)) = stream.message().await {
                if resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = watch => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    async fn campaign_inner(
        &self,
        id: String,
        shutdown: CancellationToken,
    ) -> Result<Option<Leadership>, StoreError> {
        if let Some(held) = self.held().clone() {
            if held.id == id && !held.lost.is_cancelled() {
                return Ok(Some(leadership(&held)));
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() || self.root.is_cancelled() {
                return Ok(None);
            }
            match self.try_lead(&id).await {
                Ok(Ok(held)) => {
                    info!(id, term = held.create_revision, store = %self.describe(), "won the leader lease");
                    let won = leadership(&held);
                    *self.held() = Some(held);
                    return Ok(Some(won));
                }
                Ok(Err(revision)) => {
                    backoff = Duration::from_millis(100);
                    self.wait_for_vacancy(revision, &shutdown).await;
                }
                Err(e) => {
                    // A standby outlives etcd hiccups: it keeps campaigning.
                    warn!(id, error = %e, retry_in = ?backoff, "campaign for the leader lease failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(self.config.leader_ttl);
                }
            }
        }
    }

    async fn put_worker_inner(
        &self,
        worker_id: &str,
        record_json: String,
    ) -> Result<(), StoreError> {
        let key = self.keys.worker(worker_id);
        if !self.holding() {
            // Refused before granting a lease the fenced put would then waste.
            return Err(StoreError::Fenced { key });
        }
        let mut workers = self.workers.lock().await;
        let existing = workers
            .get(worker_id)
            .filter(|w| !w.stop.is_cancelled())
            .map(|w| w.lease);
        let lease = match existing {
            Some(lease) => lease,
            None => self.grant(self.config.worker_ttl).await?,
        };
        if let Err(e) = self.put_fenced(&key, record_json, Some(lease)).await {
            if existing.is_none() {
                self.revoke(lease).await;
            }
            return Err(e);
        }
        if existing.is_none() {
            let stop = self.root.child_token();
            let ended = stop.clone();
            let worker = worker_id.to_string();
            self.spawn_keep_alive(lease, self.config.worker_ttl, stop.clone(), move |end| {
                if !matches!(end, LeaseEnd::Stopped) {
                    warn!(
                        worker,
                        "a worker's etcd lease ended; its record is gone until it is written again"
                    );
                }
                ended.cancel();
            });
            if let Some(old) = workers.insert(worker_id.to_string(), WorkerLease { lease, stop }) {
                old.stop.cancel();
            }
        }
        Ok(())
    }

    async fn drop_worker_inner(&self, worker_id: &str) -> Result<(), StoreError> {
        let key = self.keys.worker(worker_id);
        let mut workers = self.workers.lock().await;
        let removed = self
            .fenced(&key, vec![TxnOp::delete(key.clone(), None)])
            .await;
        if let Some(w) = workers.remove(worker_id) {
            w.stop.cancel();
            self.revoke(w.lease).await;
        }
        removed.map(drop)
    }

    async fn next_id_inner(&self, name: &str) -> Result<u64, StoreError> {
        let key = self.keys.id(name);
        for _ in 0..NEXT_ID_ATTEMPTS {
            let kvs = self.get(&key, None).await?;
            let (current, mod_revision) = match kvs.first() {
                None => (0, 0),
                Some(kv) => {
                    let (_, value) = text(kv)?;
                    let n = value.parse::<u64>().map_err(|e| StoreError::Corrupt {
                        key: key.clone(),
                        message: format!(
                            "counter {value:?} is not a number ({e}); set it to the highest id in use"
                        ),
                    })?;
                    (n, kv.mod_revision())
                }
            };
            let next = current + 1;
            // The inner compare catches another write of the counter in between (a missing
            // key has mod revision 0); the outer one is the fence.
            let bump = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::put(key.clone(), next.to_string(), None)]);
            let resp = self.fenced(&key, vec![TxnOp::txn(bump)]).await?;
            let bumped = resp
                .op_responses()
                .iter()
                .any(|r| matches!(r, TxnOpResponse::Txn(t) if t.succeeded()));
            if bumped {
                return Ok(next);
            }
        }
        Err(StoreError::Unavailable {
            endpoints: self.endpoints(),
            message: format!(
                "counter {key} changed under every one of {NEXT_ID_ATTEMPTS} attempts; is another process writing it?"
            ),
        })
    }

    async fn close_inner(&self) {
        let held = self.held().take();
        let workers: Vec<WorkerLease> = self.workers.lock().await.drain().map(|(_, w)| w).collect();
        for w in &workers {
            w.stop.cancel();
            self.revoke(w.lease).await;
        }
        if let Some(held) = held {
            held.lost.cancel();
            self.revoke(held.lease).await;
            info!(id = %held.id, "resigned the leader lease");
        }
        self.root.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.tasks.wait()).await;
    }
}

impl Store for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints(), self.config.prefix)
    }

    fn campaign(
        &self,
        id: &str,
        shutdown: CancellationToken,
    ) -> BoxFuture<'_, Result<Option<Leadership>, StoreError>> {
        self.campaign_inner(id.to_string(), shutdown).boxed()
    }

    fn leader(&self) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        self.leader_now().boxed()
    }

    fn put_job(&self, job_id: &str, record_json: String) -> BoxFuture<'_, Result<(), StoreError>> {
        let key = self.keys.job(job_id);
        async move { self.put_fenced(&key, record_json, None).await }.boxed()
    }

    fn jobs(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>> {
        async move { self.list(&self.keys.jobs()).await }.boxed()
    }

    fn put_checkpoint(
        &self,
        job_id: &str,
        step: u64,
        entry_json: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let key = self.keys.checkpoint(job_id, step);
        async move { self.put_fenced(&key, entry_json, None).await }.boxed()
    }

    fn checkpoints(&self, job_id: &str) -> BoxFuture<'_, Result<Vec<(u64, String)>, StoreError>> {
        let job_id = job_id.to_string();
        async move {
            let prefix = self.keys.checkpoints(&job_id);
            let kvs = self
                .get(&prefix, Some(GetOptions::new().with_prefix()))
                .await?;
            kvs.iter()
                .map(|kv| {
                    let (key, value) = text(kv)?;
                    Ok((self.keys.step_of(&job_id, &key)?, value))
                })
                .collect()
        }
        .boxed()
    }

    fn put_worker(
        &self,
        worker_id: &str,
        record_json: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let worker_id = worker_id.to_string();
        async move { self.put_worker_inner(&worker_id, record_json).await }.boxed()
    }

    fn drop_worker(&self, worker_id: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let worker_id = worker_id.to_string();
        async move { self.drop_worker_inner(&worker_id).await }.boxed()
    }

    fn workers(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>> {
        async move { self.list(&self.keys.workers()).await }.boxed()
    }

    fn next_id(&self, name: &str) -> BoxFuture<'_, Result<u64, StoreError>> {
        let name = name.to_string();
        async move { self.next_id_inner(&name).await }.boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.close_inner().boxed()
    }
}

fn leadership(held: &Held) -> Leadership {
    Leadership {
        // etcd revisions start at 1 and only grow.
        term: u64::try_from(held.create_revision).unwrap_or(0),
        lost: held.lost.clone(),
    }
}

/// A TTL in etcd's whole seconds (validated to be whole and at least [`MIN_TTL`]).
fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
}

/// A key-value pair as text; a record that is not UTF-8 is corrupt.
fn text(kv: &KeyValue) -> Result<(String, String), StoreError> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let value = kv.value_str().map_err(|e| StoreError::Corrupt {
        key: key.clone(),
        message: format!("value is not UTF-8 ({e}); delete the key or restore it from a backup"),
    })?;
    Ok((key, value.to_string()))
}

/// Runs `request` with a deadline, naming what was being done when it fails.
async fn deadline<T>(
    timeout: Duration,
    endpoints: &str,
    what: impl FnOnce() -> String,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    let message = match tokio::time::timeout(timeout, request).await {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => format!("{}: {e}", what()),
        Err(_) => format!("{}: no answer within {timeout:?}", what()),
    };
    Err(StoreError::Unavailable {
        endpoints: endpoints.to_string(),
        message,
    })
}

/// Keeps `lease` alive every third of `ttl` until `stop` fires, etcd says the lease is
/// gone, or no keep-alive succeeded for `ttl` (measured from when the last successful one
/// was sent, so this side gives up no later than etcd expires the lease).
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    request_timeout: Duration,
    endpoints: &str,
    stop: CancellationToken,
) -> LeaseEnd {
    let interval = ttl / 3;
    let mut expires = Instant::now() + ttl;
    let mut channel = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return LeaseEnd::Stopped,
            _ = tokio::time::sleep_until(expires) => return LeaseEnd::Silent,
            _ = tokio::time::sleep(interval) => {}
        }
        let sent = Instant::now();
        let budget = request_timeout.min(expires.saturating_duration_since(sent));
        let refreshed = deadline(
            budget,
            endpoints,
            || format!("keeping lease {lease:x} alive"),
            async {
                if channel.is_none() {
                    let mut leases = client.lease_client();
                    channel = Some(leases.keep_alive(lease).await?);
                }
                match channel.as_mut() {
                    Some((keeper, stream)) => {
                        keeper.keep_alive().await?;
                        Ok(stream.message().await?.map_or(0, |r| r.ttl()))
                    }
                    None => Ok(0),
                }
            },
        );
        let refreshed = tokio::select! {
            _ = stop.cancelled() => return LeaseEnd::Stopped,
            r = refreshed => r,
        };
        match refreshed {
            Ok(secs) if secs > 0 => expires = sent + ttl,
            Ok(_) => return LeaseEnd::Gone,
            Err(e) => {
                // "lease not found" from a fresh keep-alive stream: expired while away.
                if e.to_string().contains("not found") {
                    return LeaseEnd::Gone;
                }
                warn!(lease, error = %e, "an etcd lease keep-alive failed; retrying");
                channel = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_once_endpoints_are_given() {
        assert!(EtcdConfig::default().validate().is_err());
        let config = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]);
        config.validate().unwrap();
        assert_eq!(config.prefix, "/ringtrain");
        assert_eq!(config.leader_ttl, Duration::from_secs(5));
        assert_eq!(config.worker_ttl, Duration::from_secs(10));
    }

    #[test]
    fn validation_names_the_field_and_the_fix() {
        let base = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]);
        for (config, expect) in [
            (
                EtcdConfig {
                    endpoints: vec![],
                    ..base.clone()
                },
                "--etcd: no endpoints",
            ),
            (
                EtcdConfig {
                    prefix: "ringtrain".into(),
                    ..base.clone()
                },
                "--etcd-prefix: \"ringtrain\" must start with '/'",
            ),
            (
                EtcdConfig {
                    prefix: "/ringtrain/".into(),
                    ..base.clone()
                },
                "--etcd-prefix",
            ),
            (
                EtcdConfig {
                    leader_ttl: Duration::from_secs(1),
                    ..base.clone()
                },
                "leader_ttl (--leader-ttl-secs): 1s is not a whole number of seconds of at least 2s",
            ),
            (
                EtcdConfig {
                    worker_ttl: Duration::from_millis(2500),
                    ..base.clone()
                },
                "worker_ttl: 2.5s",
            ),
            (
                EtcdConfig {
                    connect_timeout: Duration::ZERO,
                    ..base.clone()
                },
                "connect_timeout: must be more than zero",
            ),
        ] {
            let e = config.validate().unwrap_err().to_string();
            assert!(e.starts_with(expect), "{e}");
        }
    }
}
