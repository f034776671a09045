//! [`MemoryStore`]: the [`Store`] of a coordinator without etcd. Nothing outlives the
//! process, and there is nobody to be fenced by, so it always leads and every write
//! succeeds.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, Leadership, Store, StoreError};

/// Everything in one map per kind. A `std::sync::Mutex` is fine: every section is a map
/// operation and none is held across an `.await` (the futures are ready at once).
#[derive(Debug, Default)]
struct State {
    leader: Option<String>,
    jobs: BTreeMap<String, String>,
    checkpoints: BTreeMap<String, BTreeMap<u64, String>>,
    workers: BTreeMap<String, String>,
    ids: BTreeMap<String, u64>,
}

/// An in-memory [`Store`] (`ringtrain local`, `ringtrain serve` without `--etcd`).
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Never cancelled: a memory store cannot lose its lease.
    lost: CancellationToken,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind, still consistent
        // (every section is a single insert or read), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn describe(&self) -> String {
        "memory".to_string()
    }

    fn campaign(
        &self,
        id: &str,
        _shutdown: CancellationToken,
    ) -> BoxFuture<'_, Result<Option<Leadership>, StoreError>> {
        self.state().leader = Some(id.to_string());
        let leadership = Leadership {
            term: 1,
            lost: self.lost.clone(),
        };
        futures::future::ready(Ok(Some(leadership))).boxed()
    }

    fn leader(&self) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        futures::future::ready(Ok(self.state().leader.clone())).boxed()
    }

    fn put_job(&self, job_id: &str, record_json: String) -> BoxFuture<'_, Result<(), StoreError>> {
        self.state().jobs.insert(job_id.to_string(), record_json);
        futures::future::ready(Ok(())).boxed()
    }

    fn jobs(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>> {
        let jobs = self
            .state()
            .jobs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        futures::future::ready(Ok(jobs)).boxed()
    }

    fn put_checkpoint(
        &self,
        job_id: &str,
        step: u64,
        entry_json: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.state()
            .checkpoints
            .entry(job_id.to_string())
            .or_default()
            .insert(step, entry_json);
        futures::future::ready(Ok(())).boxed()
    }

    fn checkpoints(&self, job_id: &str) -> BoxFuture<'_, Result<Vec<(u64, String)>, StoreError>> {
        let index = self
            .state()
            .checkpoints
            .get(job_id)
            .map(|steps| steps.iter().map(|(s, v)| (*s, v.clone())).collect())
            .unwrap_or_default();
        futures::future::ready(Ok(index)).boxed()
    }

    fn put_worker(
        &self,
        worker_id: &str,
        record_json: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.state()
            .workers
            .insert(worker_id.to_string(), record_json);
        futures::future::ready(Ok(())).boxed()
    }

    fn drop_worker(&self, worker_id: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        self.state().workers.remove(worker_id);
        futures::future::ready(Ok(())).boxed()
    }

    fn workers(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, StoreError>> {
        let workers = self
            .state()
            .workers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        futures::future::ready(Ok(workers)).boxed()
    }

    fn next_id(&self, name: &str) -> BoxFuture<'_, Result<u64, StoreError>> {
        let mut state = self.state();
        let counter = state.ids.entry(name.to_string()).or_insert(0);
        *counter += 1;
        futures::future::ready(Ok(*counter)).boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.state().workers.clear();
        futures::future::ready(()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leads_at_once_and_never_loses_the_lease() {
        let store = MemoryStore::new();
        assert_eq!(store.leader().await.unwrap(), None);
        let l = store
            .campaign("c1", CancellationToken::new())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.term, 1);
        assert!(!l.lost.is_cancelled());
        assert_eq!(store.leader().await.unwrap().as_deref(), Some("c1"));
        assert_eq!(store.describe(), "memory");
    }

    #[tokio::test]
    async fn jobs_and_checkpoints_round_trip_in_order() {
        let store = MemoryStore::new();
        store.put_job("b", "{\"n\":1}".into()).await.unwrap();
        store.put_job("a", "{\"n\":2}".into()).await.unwrap();
        store.put_job("b", "{\"n\":3}".into()).await.unwrap();
        assert_eq!(
            store.jobs().await.unwrap(),
            vec![
                ("a".to_string(), "{\"n\":2}".to_string()),
                ("b".to_string(), "{\"n\":3}".to_string())
            ]
        );
        for step in [10, 9, 100] {
            store
                .put_checkpoint("a", step, format!("{{\"step\":{step}}}"))
                .await
                .unwrap();
        }
        let steps: Vec<u64> = store
            .checkpoints("a")
            .await
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![9, 10, 100]);
        assert!(store.checkpoints("b").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn workers_come_and_go_and_ids_count_per_name() {
        let store = MemoryStore::new();
        store.put_worker("w1", "{}".into()).await.unwrap();
        store.put_worker("w2", "{}".into()).await.unwrap();
        store.drop_worker("w1").await.unwrap();
        store.drop_worker("never-seen").await.unwrap();
        assert_eq!(
            store.workers().await.unwrap(),
            vec![("w2".to_string(), "{}".to_string())]
        );
        assert_eq!(store.next_id("job").await.unwrap(), 1);
        assert_eq!(store.next_id("job").await.unwrap(), 2);
        assert_eq!(store.next_id("worker").await.unwrap(), 1);
        store.close().await;
        assert!(store.workers().await.unwrap().is_empty());
    }
}
