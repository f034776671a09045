//! The etcd store against a real etcd server (started per test on free ports; see
//! tests/support/etcd.rs): records round-trip, counters survive a change of leader, worker
//! leases end, and the leader lease elects one coordinator, fences the others, and moves
//! on when its holder dies. Plus the serving gate of `server::run` on top of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/support/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::Duration;

use etcd::Etcd;
use ringtrain_coordinator::store::{EtcdConfig, EtcdStore, Leadership, Store, StoreError};
use ringtrain_coordinator::{CoordinatorError, ServerConfig};
use ringtrain_proto::v1::{job_service_client::JobServiceClient, ListRequest};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

fn config(etcd: &Etcd, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![etcd.url().to_string()],
        prefix: prefix.to_string(),
        leader_ttl: TTL,
        worker_ttl: TTL,
        connect_timeout: Duration::from_secs(3),
    }
}

async fn store(etcd: &Etcd, prefix: &str) -> EtcdStore {
    EtcdStore::connect(config(etcd, prefix)).await.unwrap()
}

async fn lead(store: &EtcdStore, id: &str) -> Leadership {
    tokio::time::timeout(
        Duration::from_secs(5),
        store.campaign(id, CancellationToken::new()),
    )
    .await
    .expect("an uncontested campaign is won at once")
    .unwrap()
    .expect("won, not shut down")
}

/// Polls `check` every 50 ms until it holds, failing after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Revokes the lease the leader key is attached to, from outside (as etcd does when the
/// lease expires).
async fn revoke_leader_lease(etcd: &Etcd, prefix: &str) {
    let mut client = etcd_client::Client::connect([etcd.url()], None)
        .await
        .unwrap();
    let resp = client.get(format!("{prefix}/leader"), None).await.unwrap();
    let lease = resp.kvs()[0].lease();
    assert_ne!(lease, 0, "the leader key is attached to a lease");
    client.lease_revoke(lease).await.unwrap();
}

#[tokio::test]
async fn jobs_and_checkpoints_round_trip_in_key_order() {
    let etcd = Etcd::start();
    let a = store(&etcd, "/rt-a").await;
    assert_eq!(a.describe(), format!("etcd {} prefix /rt-a", etcd.url()));
    let won = lead(&a, "a").await;
    assert!(won.term > 0);
    assert_eq!(a.leader().await.unwrap().as_deref(), Some("a"));

    a.put_job("job-2", r#"{"n":1}"#.into()).await.unwrap();
    a.put_job("job-1", r#"{"n":2}"#.into()).await.unwrap();
    a.put_job("job-2", r#"{"n":3}"#.into()).await.unwrap();
    for step in [100, 9, 10] {
        a.put_checkpoint("job-1", step, format!(r#"{{"step":{step}}}"#))
            .await
            .unwrap();
    }
    a.put_checkpoint("job-10", 1, "{}".into()).await.unwrap();

    // Read back through a second connection: the records are in etcd, not in `a`.
    let reader = store(&etcd, "/rt-a").await;
    assert_eq!(
        reader.jobs().await.unwrap(),
        vec![
            ("job-1".to_string(), r#"{"n":2}"#.to_string()),
            ("job-2".to_string(), r#"{"n":3}"#.to_string()),
        ]
    );
    assert_eq!(
        reader.checkpoints("job-1").await.unwrap(),
        vec![
            (9, r#"{"step":9}"#.to_string()),
            (10, r#"{"step":10}"#.to_string()),
            (100, r#"{"step":100}"#.to_string()),
        ]
    );
    assert!(reader.checkpoints("job-3").await.unwrap().is_empty());
    // Another prefix is another cluster.
    assert!(store(&etcd, "/rt-b").await.jobs().await.unwrap().is_empty());
}

#[tokio::test]
async fn next_id_keeps_counting_across_two_store_instances() {
    let etcd = Etcd::start();
    let a = store(&etcd, "/rt").await;
    lead(&a, "a").await;
    assert_eq!(a.next_id("job").await.unwrap(), 1);
    assert_eq!(a.next_id("job").await.unwrap(), 2);
    assert_eq!(a.next_id("worker").await.unwrap(), 1);
    a.close().await;

    let b = store(&etcd, "/rt").await;
    // `a` resigned: `b` wins without waiting for a TTL.
    lead(&b, "b").await;
    assert_eq!(b.next_id("job").await.unwrap(), 3);
    assert_eq!(b.next_id("worker").await.unwrap(), 2);
}

#[tokio::test]
async fn worker_records_end_with_drop_worker_and_with_the_store() {
    let etcd = Etcd::start();
    let reader = store(&etcd, "/rt").await;
    let names = |v: Vec<(String, String)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    {
        let a = store(&etcd, "/rt").await;
        lead(&a, "a").await;
        a.put_worker("w1", r#"{"addr":"1"}"#.into()).await.unwrap();
        a.put_worker("w2", r#"{"addr":"2"}"#.into()).await.unwrap();
        a.put_worker("w2", r#"{"addr":"2b"}"#.into()).await.unwrap();
        assert_eq!(
            reader.workers().await.unwrap(),
            vec![
                ("w1".to_string(), r#"{"addr":"1"}"#.to_string()),
                ("w2".to_string(), r#"{"addr":"2b"}"#.to_string()),
            ]
        );
        a.drop_worker("w1").await.unwrap();
        assert_eq!(names(reader.workers().await.unwrap()), ["w2"]);

        // The store keeps the lease alive: the record outlives its TTL.
        tokio::time::sleep(TTL + Duration::from_secs(1)).await;
        assert_eq!(names(reader.workers().await.unwrap()), ["w2"]);
        // Dropped without close, as in a crash: nothing revokes the lease...
    }
    assert_eq!(names(reader.workers().await.unwrap()), ["w2"]);
    // ...it expires after the worker TTL (plus etcd's expiry sweep).
    let dropped = Instant::now();
    eventually(
        TTL + Duration::from_secs(2),
        "the worker record expiring",
        || async { reader.workers().await.unwrap().is_empty() },
    )
    .await;
    assert!(
        dropped.elapsed() > TTL / 2,
        "the record outlived its store for a while"
    );
}

#[tokio::test]
async fn one_leader_fences_the_other_until_its_lease_is_gone() {
    let etcd = Etcd::start();
    let a = store(&etcd, "/rt").await;
    let b = Arc::new(store(&etcd, "/rt").await);
    let a_won = lead(&a, "a").await;

    let b_campaign = tokio::spawn({
        let b = b.clone();
        async move { b.campaign("b", CancellationToken::new()).await }
    });
    // B waits while A leads (longer than a TTL: A's keep-alive is doing its job).
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert!(!b_campaign.is_finished(), "b won while a still leads");
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("a"));
    // B's writes are refused while A leads.
    for refused in [
        b.put_job("j", "{}".into()).await,
        b.put_checkpoint("j", 1, "{}".into()).await,
        b.put_worker("w", "{}".into()).await,
        b.next_id("job").await.map(drop),
    ] {
        assert!(
            matches!(refused, Err(StoreError::Fenced { .. })),
            "{refused:?}"
        );
    }
    a.put_job("j", r#"{"by":"a"}"#.into()).await.unwrap();

    // A's lease ends behind its back (as when it expires during a long pause).
    revoke_leader_lease(&etcd, "/rt").await;
    let b_won = tokio::time::timeout(TTL + Duration::from_secs(1), b_campaign)
        .await
        .expect("b takes over within the TTL and a second")
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(b_won.term > a_won.term, "{} > {}", b_won.term, a_won.term);
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("b"));

    // A may not have noticed yet, or just has: its write is refused either way.
    let stale = a.put_job("j", r#"{"by":"stale a"}"#.into()).await;
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{stale:?}");
    assert!(stale
        .unwrap_err()
        .to_string()
        .contains("no longer holds the leader lease"));
    eventually(TTL, "a's lost token firing", || async {
        a_won.lost.is_cancelled()
    })
    .await;
    b.put_job("k", "{}".into()).await.unwrap();
    assert_eq!(
        b.jobs().await.unwrap(),
        vec![
            ("j".to_string(), r#"{"by":"a"}"#.to_string()),
            ("k".to_string(), "{}".to_string())
        ]
    );
    assert!(!b_won.lost.is_cancelled());
}

#[tokio::test]
async fn a_standby_takes_over_within_the_ttl_when_the_leader_dies() {
    let etcd = Etcd::start();
    let a = store(&etcd, "/rt").await;
    let b = store(&etcd, "/rt").await;
    lead(&a, "a").await;
    let b_campaign = b.campaign("b", CancellationToken::new());
    // A dies without resigning (kill -9): its keep-alive stops, the lease runs out.
    drop(a);
    let died = Instant::now();
    let won = tokio::time::timeout(TTL + Duration::from_secs(1), b_campaign)
        .await
        .expect("b leads within the TTL and a second of a's death")
        .unwrap();
    assert!(won.is_some());
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("b"));
    eprintln!("takeover after {:?}", died.elapsed());
}

#[tokio::test]
async fn a_campaign_ends_with_shutdown() {
    let etcd = Etcd::start();
    let a = store(&etcd, "/rt").await;
    let b = store(&etcd, "/rt").await;
    lead(&a, "a").await;
    let shutdown = CancellationToken::new();
    let campaign = b.campaign("b", shutdown.clone());
    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(3), campaign)
        .await
        .expect("the campaign ends at shutdown");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
}

#[tokio::test]
async fn connecting_to_nothing_names_the_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let e = EtcdStore::connect(EtcdConfig {
        connect_timeout: Duration::from_secs(1),
        ..EtcdConfig::new(vec![url.clone()])
    })
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("etcd at {url}: cannot connect")),
        "{text}"
    );
}

/// Starts `server::run` with an etcd store on prefix /rt; returns its address.
async fn coordinator(
    etcd: &Etcd,
    shutdown: CancellationToken,
) -> (
    String,
    tokio::task::JoinHandle<Result<(), CoordinatorError>>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        store: Some(Arc::new(store(etcd, "/rt").await)),
        ..ServerConfig::default()
    };
    let run = tokio::spawn(ringtrain_coordinator::server::run(
        config, listener, shutdown,
    ));
    (addr, run, dir)
}

async fn list(addr: &str) -> Result<(), tonic::Status> {
    let mut client = JobServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client.list(ListRequest::default()).await.map(drop)
}

#[tokio::test]
async fn a_standby_coordinator_answers_unavailable_naming_the_leader() {
    let etcd = Etcd::start();
    let stop_a = CancellationToken::new();
    let (a_addr, a_run, _a_dir) = coordinator(&etcd, stop_a.clone()).await;
    eventually(Duration::from_secs(5), "a serving", || async {
        list(&a_addr).await.is_ok()
    })
    .await;
    let stop_b = CancellationToken::new();
    let (b_addr, b_run, _b_dir) = coordinator(&etcd, stop_b.clone()).await;
    let named = format!("the leader is {a_addr}");
    let started = Instant::now();
    let refused = loop {
        let answer = list(&b_addr).await;
        if let Err(s) = &answer {
            if s.message().contains(&named) {
                break s.clone();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "b never named the leader: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused
            .message()
            .starts_with("this coordinator is a standby"),
        "{}",
        refused.message()
    );

    // A shuts down cleanly: it resigns, and B serves at once (well within a TTL).
    stop_a.cancel();
    a_run.await.unwrap().unwrap();
    eventually(TTL, "b serving after a resigned", || async {
        list(&b_addr).await.is_ok()
    })
    .await;

    // B's lease ends behind its back: it stops serving and `run` says why.
    revoke_leader_lease(&etcd, "/rt").await;
    let ended = tokio::time::timeout(TTL * 2, b_run)
        .await
        .expect("b's run ends once its lease is gone")
        .unwrap();
    assert!(
        matches!(ended, Err(CoordinatorError::LeaderLost)),
        "{ended:?}"
    );
    assert_eq!(
        ended.unwrap_err().to_string(),
        "lost the leader lease; exiting so a fresh process can campaign again"
    );
    stop_b.cancel();
}
