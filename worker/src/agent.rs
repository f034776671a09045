//! The worker process: serves the `Collective` service, attaches to the coordinator and
//! runs the jobs it is assigned, one at a time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ringtrain_proto::v1::{
    collective_server::CollectiveServer, control_message,
    worker_control_client::WorkerControlClient, worker_report, Assignment, AttachRequest, Failure,
    WorkerReport,
};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tracing::{info, warn};

use crate::collective::{dial, CollectiveHub};
use crate::config::WorkerConfig;
use crate::error::WorkerError;
use crate::grpc::CollectiveService;
use crate::plan::TrainingPlan;
use crate::resume::HeldState;
use crate::trainer::{run_blocking, JobContext};
use ringtrain_core::telemetry::StepSampling;
use std::sync::atomic::{AtomicBool, Ordering};

/// How long a shutting-down worker waits for its job to wind down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Longest a cancelled job may take to stop (a collective deadline and an upload
/// deadline, with room to spare).
const STOP_LIMIT: Duration = Duration::from_secs(90);

/// How long a leaving worker (SIGTERM, ctrl-c) waits for its job to stop at a step
/// boundary before it cancels the job outright: within Kubernetes' default 30 s grace,
/// and the process still exits within 10 s.
const LEAVE_GRACE: Duration = Duration::from_secs(7);

struct RunningJob {
    job_id: String,
    generation: u64,
    cancel: CancellationToken,
    drain: Arc<AtomicBool>,
    leaving: Arc<AtomicBool>,
    /// Returns the training state the job ended with, kept for the next generation.
    task: JoinHandle<Option<HeldState>>,
}

/// Runs a worker until `shutdown` is cancelled or the coordinator tells it to stop.
/// `listener` is where ring neighbours reach its `Collective` service.
///
/// `shutdown` (SIGTERM, ctrl-c) is a graceful leave: a running job is asked to stop
/// after its current step (the other ranks stop with it and continue in a new
/// generation without this worker, losing nothing), and only if that takes longer than
/// [`LEAVE_GRACE`] is the job cancelled outright.
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let local: SocketAddr = listener.local_addr().map_err(|e| WorkerError::Connect {
        addr: "listener".into(),
        detail: e.to_string(),
    })?;
    let advertise = match config.advertise.clone() {
        Some(a) => a,
        None => default_advertise(local, &config.coordinator).await,
    };
    // The plain-TCP data plane listens beside the gRPC one, on the same interface; its
    // port is advertised next to the collective address.
    let data_listener =
        TcpListener::bind((local.ip(), 0))
            .await
            .map_err(|e| WorkerError::Connect {
                addr: format!("{}:0", local.ip()),
                detail: format!("binding the data plane: {e}"),
            })?;
    let data_port = data_listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let data_advertise = match advertise.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{data_port}"),
        None => format!("{advertise}:{data_port}"),
    };
    let data_hub = Arc::new(crate::tcp_ring::DataHub::default());
    let hub = Arc::new(CollectiveHub::default());
    let service = CollectiveServer::new(CollectiveService::new(hub.clone()))
        .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES);
    let server_stop = shutdown.child_token();
    // grpc.health.v1 on the listen port: SERVING while attached to a coordinator.
    // The service "liveness" is SERVING as long as the process answers.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health
        .set_service_status("liveness", tonic_health::ServingStatus::Serving)
        .await;
    // The listeners' tasks: the gRPC server and the data-plane accept loops, joined with
    // a bounded grace whichever way this function ends.
    let mut listeners = JoinSet::new();
    listeners.spawn({
        let stop = server_stop.clone();
        let server = Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(crate::collective::H2_STREAM_WINDOW))
            .initial_connection_window_size(Some(crate::collective::H2_CONNECTION_WINDOW))
            .max_frame_size(Some(crate::collective::H2_MAX_FRAME))
            .add_service(service)
            .add_service(health_service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                stop.cancelled().await
            });
        async move {
            if let Err(e) = server.await {
                warn!(error = %e, "collective server failed");
            }
        }
    });
    listeners.spawn(crate::tcp_ring::accept_loop(
        data_listener,
        data_hub.clone(),
        server_stop.clone(),
    ));
    let data_local = bind_local_socket(&config, data_port, &data_hub, &server_stop, &mut listeners);
    info!(collective = %advertise, data = %data_advertise, coordinator = %config.coordinator, "worker started");

    let mut running: Option<RunningJob> = None;
    // The training state of the last generation this worker ran, offered to the next.
    let mut held: Option<HeldState> = None;
    let mut backoff = Duration::from_millis(100);
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut attempt = 0usize;
    'connect: while !shutdown.is_cancelled() {
        // A leader and its standbys: a refused or unreachable one moves on to the next.
        let coordinators = config.coordinators();
        let target = coordinators[attempt % coordinators.len()].clone();
        attempt += 1;
        let connect_within = if coordinators.len() > 1 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        let channel = match dial(&target, connect_within, &shutdown).await {
            Ok(c) => c,
            Err(WorkerError::Cancelled) => break,
            Err(e) => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if config.reconnect_limit.is_some_and(|l| since.elapsed() >= l) {
                    stop_job(&mut running, &mut held).await?;
                    server_stop.cancel();
                    join_with_grace(listeners, &hub).await;
                    return Err(e);
                }
                warn!(error = %e, "coordinator unreachable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                // Capped low: a restarted coordinator should see its workers back within
                // about a second of serving again.
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let control = WorkerControlClient::new(channel)
            .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES);
        let mut stream = match control
            .clone()
            .attach(AttachRequest {
                collective_addr: advertise.clone(),
                name: config.name.clone(),
                data_addr: data_advertise.clone(),
                data_local: data_local.clone(),
                protocol_version: ringtrain_proto::PROTOCOL_VERSION,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                // A coordinator of another protocol version: retrying cannot help.
                stop_job(&mut running, &mut held).await?;
                server_stop.cancel();
                join_with_grace(listeners, &hub).await;
                return Err(WorkerError::Refused(status.message().to_string()));
            }
            Err(status) => {
                warn!(%status, coordinator = %target, "attach refused; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        failing_since = None;
        let mut worker_id = String::new();
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Leave while still attached: the coordinator must hear this
                    // worker's stop report before its attach stream closes, or it would
                    // count the worker as lost rather than gone.
                    leave_job(&mut running, &mut held).await;
                    break 'connect;
                }
                m = stream.message() => m,
            };
            let kind = match msg {
                Ok(Some(m)) => m.kind,
                Ok(None) | Err(_) => {
                    warn!("lost the coordinator; cancelling any job (its state is kept) and reattaching");
                    health
                        .set_service_status("", tonic_health::ServingStatus::NotServing)
                        .await;
                    stop_job(&mut running, &mut held).await?;
                    continue 'connect;
                }
            };
            match kind {
                Some(control_message::Kind::Registered(r)) => {
                    if r.protocol_version != ringtrain_proto::PROTOCOL_VERSION {
                        stop_job(&mut running, &mut held).await?;
                        server_stop.cancel();
                        join_with_grace(listeners, &hub).await;
                        return Err(WorkerError::Refused(format!(
                            "the coordinator speaks protocol version {}, this worker speaks version {}; run the same ringtrain release on both",
                            r.protocol_version,
                            ringtrain_proto::PROTOCOL_VERSION
                        )));
                    }
                    info!(worker_id = %r.worker_id, "registered with the coordinator");
                    config.instance.set(&r.worker_id);
                    health
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                    worker_id = r.worker_id;
                }
                Some(control_message::Kind::Assignment(mut a)) => {
                    // One job at a time: a previous job was cancelled before this
                    // assignment was sent, so wait for it to wind down first.
                    stop_job(&mut running, &mut held).await?;
                    if !config.local_socket {
                        // --tcp-only: do not dial neighbours' same-host sockets either.
                        a.data_locals.clear();
                    }
                    config.metrics.set_generation(a.generation);
                    running = Some(start_job(
                        a,
                        control.clone(),
                        (hub.clone(), data_hub.clone()),
                        (worker_id.clone(), config.trace_steps),
                        held.take(),
                        config.metrics.clone(),
                    ));
                }
                Some(control_message::Kind::Cancel(c)) => {
                    if let Some(r) = &running {
                        if r.job_id == c.job_id && r.generation == c.generation {
                            info!(job = %c.job_id, reason = %c.reason, "job cancelled by coordinator");
                            r.cancel.cancel();
                        }
                    }
                }
                Some(control_message::Kind::Drain(d)) => {
                    if let Some(r) = &running {
                        if r.job_id == d.job_id && r.generation == d.generation {
                            info!(job = %d.job_id, reason = %d.reason, "draining: stopping after the current step");
                            r.drain.store(true, Ordering::Release);
                        }
                    }
                }
                Some(control_message::Kind::Shutdown(_)) => {
                    info!("coordinator asked this worker to shut down");
                    break 'connect;
                }
                None => {}
            }
        }
    }
    if shutdown.is_cancelled() {
        leave_job(&mut running, &mut held).await;
    }
    let stopped = stop_job(&mut running, &mut held).await;
    server_stop.cancel();
    join_with_grace(listeners, &hub).await;
    stopped
}

/// A graceful leave: asks the running job to stop after its current step (reporting
/// that this worker leaves) and waits up to [`LEAVE_GRACE`] for it.
async fn leave_job(running: &mut Option<RunningJob>, held: &mut Option<HeldState>) {
    let Some(r) = running.as_mut() else {
        return;
    };
    info!(job = %r.job_id, "leaving: stopping the job after its current step");
    r.leaving.store(true, Ordering::Release);
    r.drain.store(true, Ordering::Release);
    match tokio::time::timeout(LEAVE_GRACE, &mut r.task).await {
        Ok(state) => {
            *held = state.ok().flatten();
            *running = None;
        }
        Err(_) => warn!(
            job = %r.job_id,
            "the job did not stop at a step boundary within the grace; cancelling it"
        ),
    }
}

/// Joins the (already stopped) listener tasks and the ring's outgoing streams, waiting
/// at most [`SHUTDOWN_GRACE`] for each group; whatever is still running is then aborted.
async fn join_with_grace(mut listeners: JoinSet<()>, hub: &CollectiveHub) {
    let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(r) = listeners.join_next().await {
            if let Err(e) = r {
                warn!(error = %e, "a listener task failed");
            }
        }
    })
    .await;
    if joined.is_err() {
        warn!(
            tasks = listeners.len(),
            "listener tasks did not stop within the grace; aborting them"
        );
        listeners.shutdown().await;
    }
    hub.shutdown(SHUTDOWN_GRACE).await;
}

fn start_job(
    a: Assignment,
    control: WorkerControlClient<Channel>,
    (hub, data_hub): (Arc<CollectiveHub>, Arc<crate::tcp_ring::DataHub>),
    (worker_id, trace_steps): (String, StepSampling),
    held: Option<HeldState>,
    metrics: Arc<crate::metrics::WorkerMetrics>,
) -> RunningJob {
    // Not a child of the process's shutdown token: a shutdown is a graceful leave,
    // which stops the job at a step boundary through `drain` instead.
    let cancel = CancellationToken::new();
    let drain = Arc::new(AtomicBool::new(false));
    let leaving = Arc::new(AtomicBool::new(false));
    let (job_drain, job_leaving) = (drain.clone(), leaving.clone());
    let job_id = a.job_id.clone();
    let generation = a.generation;
    info!(job = %job_id, generation, rank = a.rank, world = a.world, "assignment received");
    let handle = tokio::runtime::Handle::current();
    let token = cancel.clone();
    let task = tokio::task::spawn_blocking(move || {
        let plan = match TrainingPlan::from_json(&a.plan_json) {
            Ok(p) => p,
            Err(e) => {
                // Tell the coordinator, so the job fails with the real reason instead of
                // waiting for a rank that never starts.
                warn!(error = %e, "rejecting assignment");
                let report = WorkerReport {
                    job_id: a.job_id.clone(),
                    generation: a.generation,
                    rank: a.rank,
                    worker_id,
                    kind: Some(worker_report::Kind::Failure(Failure {
                        message: format!("worker rejected the assignment: {e}"),
                        lost_rank: None,
                    })),
                };
                let mut control = control;
                let sent = handle.block_on(async move {
                    tokio::time::timeout(
                        SHUTDOWN_GRACE,
                        control.report(tokio_stream::iter(vec![report])),
                    )
                    .await
                });
                match sent {
                    Ok(Ok(_)) => {}
                    Ok(Err(status)) => {
                        warn!(%status, "could not report the rejected assignment")
                    }
                    Err(_) => warn!("reporting the rejected assignment timed out"),
                }
                return held;
            }
        };
        let ctx = JobContext {
            handle,
            control,
            hub,
            data_hub,
            worker_id,
            assignment: a,
            plan,
            cancel: token,
            drain: job_drain,
            leaving: job_leaving,
            stall_reports: None,
            metrics,
            trace_steps,
        };
        // The outcome is logged and reported to the coordinator inside.
        let (_, state) = run_blocking(ctx, held);
        state
    });
    RunningJob {
        job_id,
        generation,
        cancel,
        drain,
        leaving,
        task,
    }
}

/// Cancels the running job and waits until its thread has returned: a blocking task
/// cannot be aborted, and two jobs must never share this worker. Every collective and
/// RPC it may be in has a deadline, so it normally returns within one of them; the wait
/// is capped at [`STOP_LIMIT`] all the same, and a job still running then is an error
/// (the caller exits rather than start a second job beside it).
async fn stop_job(
    running: &mut Option<RunningJob>,
    held: &mut Option<HeldState>,
) -> Result<(), WorkerError> {
    let Some(mut r) = running.take() else {
        return Ok(());
    };
    r.cancel.cancel();
    if let Ok(state) = tokio::time::timeout(SHUTDOWN_GRACE, &mut r.task).await {
        *held = state.ok().flatten();
        return Ok(());
    }
    warn!(job = %r.job_id, "job is still winding down; waiting for it");
    match tokio::time::timeout(STOP_LIMIT - SHUTDOWN_GRACE, &mut r.task).await {
        Ok(state) => {
            *held = state.ok().flatten();
            Ok(())
        }
        Err(_) => Err(WorkerError::Stuck {
            job: r.job_id.clone(),
            waited: STOP_LIMIT,
        }),
    }
}

/// Binds the same-host data socket when enabled (Linux), spawning its accept loop into
/// `tasks`; returns the name to advertise (empty when there is none: ranks then dial
/// TCP).
fn bind_local_socket(
    config: &WorkerConfig,
    data_port: u16,
    hub: &Arc<crate::tcp_ring::DataHub>,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> String {
    if !config.local_socket {
        return String::new();
    }
    #[cfg(target_os = "linux")]
    match crate::tcp_ring::bind_local(&data_port.to_string()) {
        Ok((listener, name)) => {
            tasks.spawn(crate::tcp_ring::accept_local_loop(
                listener,
                hub.clone(),
                stop.clone(),
            ));
            return name;
        }
        Err(e) => warn!(error = %e, "no same-host data socket; ring data stays on TCP"),
    }
    let _ = (data_port, hub, stop, tasks);
    String::new()
}

/// The address ring neighbours dial when `--advertise` is not given: the bound one, or,
/// for a worker bound to every interface (`0.0.0.0`, `::`, as in a container), the local
/// address of the interface its traffic to the coordinator leaves from. That is the
/// address its peers on the same network reach it at; advertising `0.0.0.0` would send
/// every peer to itself.
async fn default_advertise(local: SocketAddr, coordinators: &str) -> String {
    if !local.ip().is_unspecified() {
        return local.to_string();
    }
    match route_to(coordinators).await {
        Some(ip) => {
            let chosen = SocketAddr::new(ip, local.port()).to_string();
            info!(advertise = %chosen, "no --advertise: using the address that reaches the coordinator");
            chosen
        }
        None => {
            warn!(
                listen = %local,
                coordinator = coordinators,
                "bound to every interface and no route to the coordinator found: set \
                 --advertise (RINGTRAIN_ADVERTISE) to the address peers should dial"
            );
            local.to_string()
        }
    }
}

/// The local IP the kernel would send from to the first coordinator address that
/// resolves. A connected UDP socket only picks a route; no packet is sent.
async fn route_to(coordinators: &str) -> Option<IpAddr> {
    for url in coordinators.split(',') {
        let host_port = url
            .trim()
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let Ok(addrs) = tokio::net::lookup_host(host_port).await else {
            continue;
        };
        for addr in addrs {
            let any: SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(socket) = tokio::net::UdpSocket::bind(any).await else {
                continue;
            };
            if socket.connect(addr).await.is_ok() {
                if let Ok(me) = socket.local_addr() {
                    if !me.ip().is_unspecified() {
                        return Some(me.ip());
                    }
                }
            }
        }
    }
    None
}
