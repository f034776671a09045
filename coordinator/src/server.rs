//! Serving the coordinator on a bound listener until a shutdown token fires.
//!
//! Only the leader serves. [`run`] campaigns for the leader lease of the configured
//! [`Store`] while a [`Gate`] answers every call with UNAVAILABLE (a standby); once the
//! lease is won it restores state from the store, opens the gate and serves. When the
//! lease is lost it closes the gate and returns [`CoordinatorError::LeaderLost`], so the
//! process exits and its supervisor starts a fresh one that campaigns again.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ringtrain_proto::v1::{
    job_service_server::JobServiceServer, worker_control_server::WorkerControlServer,
};
use ringtrain_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Server;
use tonic::Status;
use tracing::{error, info};

use crate::config::ServerConfig;
use crate::error::CoordinatorError;
use crate::grpc::CoordinatorApi;
use crate::service::Coordinator;
use crate::store::{BoxFuture, Leadership, Store, StoreError};

/// How long background tasks get to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often a standby asks the store who leads, for its UNAVAILABLE answers.
const LEADER_REFRESH: Duration = Duration::from_secs(1);

/// Whether a coordinator serves calls or answers UNAVAILABLE (the tonic interceptor in
/// front of both services). Clones share one state.
#[derive(Debug, Clone)]
pub struct Gate {
    state: Arc<watch::Sender<GateState>>,
}

/// What a [`Gate`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateState {
    /// Not leading: every call is answered UNAVAILABLE, naming the leader when known.
    Standby {
        /// The id of the coordinator that leads, if one does.
        leader: Option<String>,
    },
    /// Leading: calls pass.
    Serving,
}

impl Gate {
    /// A closed gate (a standby that does not know the leader yet).
    pub fn standby() -> Self {
        Gate {
            state: Arc::new(watch::Sender::new(GateState::Standby { leader: None })),
        }
    }

    /// An open gate (what [`serve`] uses: a coordinator that leads by construction).
    pub fn serving() -> Self {
        let gate = Gate::standby();
        gate.open();
        gate
    }

    /// Lets calls through.
    pub fn open(&self) {
        self.state.send_replace(GateState::Serving);
    }

    /// Answers calls with UNAVAILABLE from now on, naming `leader`.
    pub fn close(&self, leader: Option<String>) {
        self.state.send_replace(GateState::Standby { leader });
    }

    /// Names the leader in a standby's answers (no effect while serving).
    pub fn set_leader(&self, leader: Option<String>) {
        self.state.send_if_modified(|s| match s {
            GateState::Standby { leader: known } if *known != leader => {
                *known = leader;
                true
            }
            _ => false,
        });
    }

    /// A receiver that sees every change (the health service follows it).
    pub fn subscribe(&self) -> watch::Receiver<GateState> {
        self.state.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> GateState {
        self.state.borrow().clone()
    }

    /// `Ok` while serving, else the UNAVAILABLE a standby answers.
    pub fn check(&self) -> Result<(), Status> {
        match &*self.state.borrow() {
            GateState::Serving => Ok(()),
            GateState::Standby { leader } => {
                Err(Status::unavailable(standby_message(leader.as_deref())))
            }
        }
    }
}

impl Interceptor for Gate {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        self.check().map(|()| request)
    }
}

/// What a standby answers (pure, so it is tested directly).
fn standby_message(leader: Option<&str>) -> String {
    match leader {
        Some(id) => format!(
            "this coordinator is a standby; the leader is {id} — retry, or point the client at the leader"
        ),
        None => "this coordinator is a standby and no leader is elected yet — retry in a few seconds".to_string(),
    }
}

/// Serves `core` on `listener` until `shutdown` is cancelled, with an open gate (a
/// coordinator that needs no election: `ringtrain local`, tests).
pub async fn serve(
    core: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    serve_gated(core, listener, shutdown, Gate::serving()).await
}

/// Serves `core` on `listener` until `shutdown` is cancelled; `gate` decides whether calls
/// reach it.
pub async fn serve_gated(
    core: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: CancellationToken,
    gate: Gate,
) -> Result<(), CoordinatorError> {
    let api = CoordinatorApi::new(core.clone());
    // Server reflection (grpcurl, grpcui, Postman work without the .proto files). It sits
    // outside the gate like health: describing the API reveals nothing a standby guards.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ringtrain_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Transport(format!("building gRPC reflection: {e}")))?;
    // grpc.health.v1, outside the gate: SERVING while the gate is open (with etcd: only
    // the leader), NOT_SERVING otherwise, for readiness probes and load balancers. The
    // service "liveness" is SERVING as long as the process answers: a liveness probe
    // must not kill a healthy standby.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("liveness", tonic_health::ServingStatus::Serving)
        .await;
    let mut gate_state = gate.subscribe();
    let health_stop = shutdown.clone();
    let follower = tokio::spawn(async move {
        loop {
            let serving = matches!(*gate_state.borrow_and_update(), GateState::Serving);
            for name in ["", "ringtrain.v1.JobService", "ringtrain.v1.WorkerControl"] {
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                health.set_service_status(name, status).await;
            }
            tokio::select! {
                _ = health_stop.cancelled() => break,
                r = gate_state.changed() => if r.is_err() { break },
            }
        }
    });
    let result = Server::builder()
        .tcp_nodelay(true)
        // A worker behind a partition sends nothing and receives nothing; keepalive pings
        // are what notice it (its attach stream then ends and it is detached).
        .http2_keepalive_interval(Some(core.config().keepalive_interval))
        .http2_keepalive_timeout(Some(core.config().keepalive_timeout))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(InterceptedService::new(
            JobServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            gate.clone(),
        ))
        .add_service(InterceptedService::new(
            WorkerControlServer::new(api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            gate,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .map_err(|e| CoordinatorError::Transport(e.to_string()));
    follower.abort();
    core.close();
    core.tasks().close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, core.tasks().wait()).await;
    result
}

/// Builds a coordinator from `config` and serves it while it holds the leader lease of
/// `config.store` (the `ringtrain serve` entry point). Returns `Ok` after `shutdown`,
/// [`CoordinatorError::LeaderLost`] when the lease is lost; either way the store is closed
/// (its leases revoked, so a standby takes over at once).
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    run_with(
        Coordinator::new(config),
        Gate::standby(),
        listener,
        shutdown,
    )
    .await
}

/// [`run`] for a coordinator the caller built, behind a closed `gate` the caller may watch
/// (the `/metrics` endpoint reads the coordinator's gauges and whether it leads).
pub async fn run_with(
    core: Arc<Coordinator>,
    gate: Gate,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    // The coordinator writes through the very store it campaigns in.
    let store = core.store();
    let id = coordinator_id(&listener);
    let serving = shutdown.child_token();

    let mut campaign = store.campaign(&id, shutdown.clone());
    // A memory store leads at once: the gate opens before the first call can arrive.
    let early = (&mut campaign).now_or_never();
    let server = serve_gated(core.clone(), listener, serving.clone(), gate.clone());
    tokio::pin!(server);

    let lead = async {
        let won = match early {
            Some(won) => won?,
            None => {
                info!(id, store = %store.describe(), "campaigning for the leader lease; answering unavailable until it is won");
                campaign_naming_leader(&*store, campaign, &gate).await?
            }
        };
        let Some(leadership) = won else {
            return Ok(()); // shutdown during the campaign
        };
        lead(&core, &gate, &id, leadership, &shutdown).await
    };
    let mut served = None;
    let led = tokio::select! {
        r = &mut server => {
            served = Some(r);
            Ok(())
        }
        r = lead => r,
    };
    gate.close(None);
    serving.cancel();
    let served = match served {
        Some(r) => r,
        None => server.await,
    };
    store.close().await;
    if let Err(e) = &led {
        error!(id, error = %e, "coordinator stops");
    }
    led.and(served)
}

/// Restores state, opens the gate, and serves until `shutdown` (`Ok`) or until the lease
/// is lost (`LeaderLost`, with the gate closed again).
async fn lead(
    core: &Coordinator,
    gate: &Gate,
    id: &str,
    leadership: Leadership,
    shutdown: &CancellationToken,
) -> Result<(), CoordinatorError> {
    // The one place state comes back from the store: before the gate opens.
    core.restore_from_store().await?;
    gate.open();
    info!(id, term = leadership.term, "leading: serving calls");
    tokio::select! {
        _ = leadership.lost.cancelled() => {
            gate.close(None);
            Err(CoordinatorError::LeaderLost)
        }
        _ = shutdown.cancelled() => Ok(()),
    }
}

/// Drives `campaign` while keeping the gate's idea of the leader fresh.
async fn campaign_naming_leader(
    store: &dyn Store,
    mut campaign: BoxFuture<'_, Result<Option<Leadership>, StoreError>>,
    gate: &Gate,
) -> Result<Option<Leadership>, StoreError> {
    loop {
        let refresh = async {
            if let Ok(leader) = store.leader().await {
                gate.set_leader(leader);
            }
            tokio::time::sleep(LEADER_REFRESH).await;
        };
        tokio::select! {
            won = &mut campaign => return won,
            () = refresh => {}
        }
    }
}

/// This process's id in the leader key (and its `service.instance.id` in traces): the
/// address clients should use, and the pid.
pub fn coordinator_id(listener: &TcpListener) -> String {
    let addr = listener.local_addr().ok();
    let host = match addr {
        Some(a) if !a.ip().is_unspecified() => a.ip().to_string(),
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string()),
    };
    let port = addr.map_or(0, |a| a.port());
    format!("{host}:{port} (pid {})", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringtrain_proto::v1::{
        job_service_client::JobServiceClient, worker_control_client::WorkerControlClient,
        AttachRequest, JobRequest, SubmitRequest,
    };
    use tokio::io::AsyncWriteExt;

    #[test]
    fn a_standby_answers_unavailable_naming_the_leader_until_opened() {
        let gate = Gate::standby();
        let s = gate.check().unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().contains("no leader is elected yet"),
            "{}",
            s.message()
        );
        gate.set_leader(Some("10.0.0.5:7070 (pid 7)".into()));
        let s = gate.check().unwrap_err();
        assert_eq!(
            s.message(),
            "this coordinator is a standby; the leader is 10.0.0.5:7070 (pid 7) — retry, or point the client at the leader"
        );
        gate.clone().open();
        assert!(gate.check().is_ok());
        // Naming a leader does not close an open gate.
        gate.set_leader(Some("other".into()));
        assert_eq!(gate.state(), GateState::Serving);
        gate.close(None);
        assert!(gate.check().is_err());
    }

    #[tokio::test]
    async fn run_with_the_memory_store_serves_from_the_first_call() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            ..ServerConfig::default()
        };
        let server = tokio::spawn(run(config, listener, stop.clone()));
        let mut jobs = JobServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        jobs.list(ringtrain_proto::v1::ListRequest::default())
            .await
            .unwrap();
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// A TCP relay to `target` that can be frozen: once `freeze` fires it stops moving
    /// bytes either way but keeps both sockets open, as a network partition does.
    async fn relay(
        target: std::net::SocketAddr,
        freeze: CancellationToken,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let freeze = freeze.clone();
                tokio::spawn(async move {
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let pump = async {
                        tokio::join!(
                            tokio::io::copy(&mut ri, &mut wo),
                            tokio::io::copy(&mut ro, &mut wi)
                        )
                    };
                    tokio::select! {
                        _ = pump => {}
                        _ = freeze.cancelled() => {}
                    }
                    // Hold the sockets open, silent, until the test ends.
                    std::future::pending::<()>().await;
                    let _ = (wi.shutdown().await, wo.shutdown().await);
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_partitioned_worker_of_a_one_worker_job_is_noticed_by_keepalive() {
        let dir = tempfile::tempdir().unwrap();
        let core = Coordinator::new(ServerConfig {
            data_dir: dir.path().to_path_buf(),
            keepalive_interval: Duration::from_millis(300),
            keepalive_timeout: Duration::from_millis(600),
            ..ServerConfig::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(core.clone(), listener, stop.clone()));
        let freeze = CancellationToken::new();
        let via = relay(server_addr, freeze.clone()).await;
        // The "worker" attaches through the relay and then only listens, as a worker
        // busy in a one-worker job does: nothing else would notice it vanish.
        let mut worker = WorkerControlClient::connect(format!("http://{via}"))
            .await
            .unwrap();
        let mut control = worker
            .attach(AttachRequest {
                collective_addr: "127.0.0.1:1".into(),
                name: "partitioned".into(),
                protocol_version: ringtrain_proto::PROTOCOL_VERSION,
                ..AttachRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut jobs = JobServiceClient::connect(format!("http://{server_addr}"))
            .await
            .unwrap();
        let id = jobs
            .submit(SubmitRequest {
                spec_toml: crate::test_jobs::tiny(1, 50),
                ..SubmitRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        // Registered, then the assignment.
        for _ in 0..2 {
            control.message().await.unwrap().unwrap();
        }
        freeze.cancel();
        let started = tokio::time::Instant::now();
        // Noticed: the job lost its only worker and waits for another.
        loop {
            let s = jobs
                .get(JobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if s.state == "waiting" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the partitioned worker was never noticed: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.cancel();
        let _ = server.await;
    }
}
