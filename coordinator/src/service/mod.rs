//! The coordinator's core: the shell around the job state machine. It holds jobs and
//! workers, turns what arrives (submits, attaches, reports, uploads) into
//! [`job_machine::Event`]s, and carries out the [`Effect`]s the machine returns: sending
//! assignments and cancellations down workers' attach streams, writing checkpoints,
//! publishing status.
//!
//! State lives behind one `std::sync::Mutex`: every section is short bookkeeping and none
//! is held across an `.await` (file writes and data loading run on blocking threads,
//! outside the lock).
//!
//! # Layout
//! - this file: the state, the effect executor, jobs (submit, cancel, the scheduler) and
//!   workers (attach, detach);
//! - [`reports`]: what workers send back: step/epoch reports, checkpoints, shard requests;
//! - [`job_data`]: loading and normalizing a job's datasets;
//! - [`outputs`]: the files a run leaves (metrics.jsonl, model.json, model.safetensors);
//! - [`workers`]: attach and detach; [`gauges`]: the counts `/metrics` exports;
//! - [`restore`]: writes to the store and the restore after a restart; [`resume`]:
//!   `--resume RUN_DIR`;
//! - [`uploads`]: dataset files uploaded before a submit (`UploadData`, `HasData`).
//!   `--resume RUN_DIR`.
//! - [`trace`]: the job's exported `job` and `generation` spans.
//!
//! [`job_machine::Event`]: crate::job_machine::Event

mod gauges;
mod job_data;
mod outputs;
mod privacy;
mod reports;
mod restore;
mod resume;
mod trace;
mod uploads;
mod workers;

use job_data::load_data;
pub use job_data::JobData;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::Stream;
use ringtrain_core::plan::TrainingPlan;
use ringtrain_core::{Generation, JobId, Rank, WorkerId};
use ringtrain_proto::v1::{
    control_message, Assignment, CancelJob, ControlMessage, Drain, GenerationEvent, JobStatus,
    Metrics, SubmitRequest,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tracing::{info, warn};

use crate::checkpoint::CheckpointStore;
use crate::config::ServerConfig;
use crate::error::CoordinatorError;
use crate::job_file::{JobFile, PlanData};
use crate::job_machine::{
    Effect, Event, JobMachine, JobState, LossPolicy, MachineConfig, StartKind,
};
use ringtrain_core::data_path::DataRoots;

/// Control messages buffered per worker. A worker reads its stream continuously, so a
/// full buffer means it is stuck: it is dropped rather than sent to silently.
const CONTROL_CAPACITY: usize = 16;

/// How long an unconfirmed peer-loss report waits for the real culprit's detach.
const SUSPECT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// What the attach stream carries; it ends when the coordinator drops the worker.
pub type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[derive(Debug)]
struct WorkerEntry {
    addr: String,
    data_addr: String,
    data_local: String,
    name: String,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
    /// Ends the worker's attach stream when the coordinator gives up on it.
    kick: CancellationToken,
    job: Option<JobId>,
}

#[derive(Debug)]
struct JobEntry {
    id: JobId,
    /// The request as it took effect (a resume's filled in from its run directory):
    /// what a restarted coordinator rebuilds the job from.
    request: SubmitRequest,
    /// What was last written to the store, to write only on change.
    persisted: Option<crate::job_machine::SnapshotKey>,
    /// Ranks of the running generation waiting in a step's all-reduce: (generation,
    /// rank) -> (step, seconds waited).
    waiting: BTreeMap<(u64, u32), (u64, f64)>,
    file: JobFile,
    spec_hash: String,
    plan: TrainingPlan,
    /// The plan as sent in every assignment (encoded once, at submit).
    plan_json: String,
    data: Arc<JobData>,
    machine: JobMachine,
    status: watch::Sender<JobStatus>,
    out_dir: PathBuf,
    store: CheckpointStore,
    trace: trace::JobTrace,
    /// DP-SGD's accounting (`None`: the job does not train privately).
    privacy: Option<ringtrain_core::privacy::PrivacyRun>,
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<u64, JobEntry>,
    job_index: HashMap<JobId, u64>,
    workers: BTreeMap<u64, (WorkerId, WorkerEntry)>,
    next_job: u64,
    next_worker: u64,
    /// Workers whose control stream failed while effects ran; dropped by
    /// [`Coordinator::settle`] once the current effects are done.
    unreachable: Vec<WorkerId>,
}

impl State {
    fn job_number(&self, id: &str) -> Result<u64, CoordinatorError> {
        self.job_index
            .get(&JobId::from(id))
            .copied()
            .ok_or_else(|| CoordinatorError::UnknownJob(id.to_string()))
    }

    fn job(&mut self, id: &str) -> Result<&mut JobEntry, CoordinatorError> {
        let n = self.job_number(id)?;
        self.jobs
            .get_mut(&n)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.to_string()))
    }

    fn worker(&mut self, id: &WorkerId) -> Option<&mut WorkerEntry> {
        parse_num(&id.0, "w-")
            .and_then(|n| self.workers.get_mut(&n))
            .map(|(_, w)| w)
    }

    /// Queues a control message for a worker. A full or closed stream marks the worker
    /// unreachable (it is dropped once the current effects are done); nothing is
    /// dropped silently.
    fn send_control(&mut self, id: &WorkerId, kind: control_message::Kind) -> bool {
        let Some(w) = self.worker(id) else {
            return false;
        };
        match w.tx.try_send(Ok(ControlMessage { kind: Some(kind) })) {
            Ok(()) => true,
            Err(e) => {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "its control stream is full",
                    mpsc::error::TrySendError::Closed(_) => "its control stream is closed",
                };
                warn!(worker = %id, reason = why, "worker unreachable; dropping it");
                self.unreachable.push(id.clone());
                false
            }
        }
    }
}

fn parse_num(id: &str, prefix: &str) -> Option<u64> {
    id.strip_prefix(prefix)?.parse().ok()
}

/// A job file parsed, validated and loaded.
struct Prepared {
    source: String,
    base: PathBuf,
    file: JobFile,
    data: JobData,
    spec_hash: String,
    plan: TrainingPlan,
    plan_json: String,
    privacy: Option<ringtrain_core::privacy::PrivacyRun>,
    /// The privacy spent at the start (`None`: not a DP job, or not loaded).
    privacy_status: Option<ringtrain_proto::v1::PrivacyStatus>,
}

/// What an assignment says besides the members.
struct GenerationStart {
    generation: Generation,
    state_floor: Generation,
    checkpoint: Option<ringtrain_core::Step>,
}

/// The coordinator. Cheap to share (`Arc`); every method is safe to call concurrently.
#[derive(Debug)]
pub struct Coordinator {
    config: ServerConfig,
    /// Distinguishes this coordinator's job ids from an earlier run's, so run and
    /// checkpoint directories never collide.
    epoch_tag: String,
    state: Mutex<State>,
    tasks: TaskTracker,
    /// Where jobs, checkpoint indexes and worker leases are kept (memory or etcd).
    store: Arc<dyn crate::store::Store>,
    /// The store writer's queue (none outside a runtime: nothing is persisted then;
    /// taken by [`Coordinator::close`], which lets the writer flush and end).
    store_tx: Mutex<Option<mpsc::Sender<restore::StoreOp>>>,
    /// Cancelled by [`Coordinator::close`]: timers end instead of outliving the server.
    closing: CancellationToken,
    /// This coordinator, for tasks it spawns from `&self` methods.
    me: std::sync::Weak<Coordinator>,
}

impl Coordinator {
    /// A coordinator with no jobs and no workers.
    pub fn new(config: ServerConfig) -> Arc<Self> {
        let tag = random_bytes::<2>()
            .map(u16::from_le_bytes)
            .unwrap_or_else(|_| {
                // No OS entropy: the process id still keeps two live coordinators apart.
                std::process::id() as u16
            });
        let store: Arc<dyn crate::store::Store> = match &config.store {
            Some(s) => s.clone(),
            None => Arc::new(crate::store::MemoryStore::new()),
        };
        let tasks = TaskTracker::new();
        let store_tx = tokio::runtime::Handle::try_current().ok().map(|_| {
            let (tx, rx) = mpsc::channel(restore::STORE_QUEUE);
            tasks.spawn(restore::write_loop(store.clone(), rx));
            tx
        });
        Arc::new_cyclic(|me| Coordinator {
            config,
            epoch_tag: format!("{tag:04x}"),
            state: Mutex::new(State::default()),
            tasks,
            store,
            store_tx: Mutex::new(store_tx),
            closing: CancellationToken::new(),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves bookkeeping that is still consistent
        // enough to report on; keep serving rather than poisoning every later call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How this coordinator runs.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The store this coordinator writes through (and campaigns in, under
    /// [`crate::server::run`]): the configured one, or its own in-memory store.
    pub fn store(&self) -> Arc<dyn crate::store::Store> {
        self.store.clone()
    }

    /// Background tasks (attach watchers, timers, the store writer), for a bounded
    /// shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Winds the background work down: timers end, and the store writer flushes what is
    /// queued and ends. Call before waiting for [`Coordinator::tasks`].
    pub fn close(&self) {
        self.closing.cancel();
        self.store_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    // ------------------------------------------------------------------ the shell

    /// Feeds one event to job `n`'s machine and carries out its effects. Returns the
    /// effects the caller must carry out itself (checkpoint writes, which leave the lock).
    fn apply(&self, st: &mut State, n: u64, event: Event) -> Vec<Effect> {
        let Some(job) = st.jobs.get_mut(&n) else {
            return Vec::new();
        };
        let effects = job.machine.handle(event);
        let mut deferred = Vec::new();
        for effect in effects {
            match effect {
                Effect::SendAssignment {
                    generation,
                    members,
                    resume_from,
                    state_floor,
                    checkpoint,
                } => {
                    let start = GenerationStart {
                        generation,
                        state_floor,
                        checkpoint,
                    };
                    if let Err(message) = self.send_assignments(st, n, &start, &members) {
                        let more = self.apply(st, n, Event::Fault { message });
                        deferred.extend(more);
                    } else {
                        info!(job = ?st.jobs.get(&n).map(|j| &j.id), generation = generation.0, from_step = resume_from.0, workers = ?members, "generation started");
                    }
                }
                Effect::DrainGeneration {
                    generation,
                    workers,
                    reason,
                } => {
                    let Some(id) = st.jobs.get(&n).map(|j| j.id.clone()) else {
                        continue;
                    };
                    info!(job = %id, generation = generation.0, reason = %reason, "draining the generation at the next step boundary");
                    for w in workers {
                        st.send_control(
                            &w,
                            control_message::Kind::Drain(Drain {
                                job_id: id.0.clone(),
                                generation: generation.0,
                                reason: reason.clone(),
                            }),
                        );
                    }
                }
                Effect::Expel { worker } => {
                    if st.worker(&worker).is_some() {
                        warn!(worker = %worker, "detaching a worker its job lost; it may attach again");
                        st.unreachable.push(worker);
                    }
                }
                Effect::WaitDeadline { token } => {
                    let wait = st
                        .jobs
                        .get(&n)
                        .map(|j| std::time::Duration::from_secs(j.file.fault.max_wait_secs))
                        .unwrap_or_default();
                    self.later(n, wait, Event::WaitExpired { token });
                }
                Effect::CancelGeneration {
                    generation,
                    workers,
                    reason,
                } => {
                    let Some(id) = st.jobs.get(&n).map(|j| j.id.clone()) else {
                        continue;
                    };
                    for w in workers {
                        if let Some(entry) = st.worker(&w) {
                            if entry.job.as_ref() == Some(&id) {
                                entry.job = None;
                            }
                        }
                        st.send_control(
                            &w,
                            control_message::Kind::Cancel(CancelJob {
                                job_id: id.0.clone(),
                                generation: generation.0,
                                reason: reason.clone(),
                            }),
                        );
                    }
                }
                Effect::Release { workers } => {
                    for w in workers {
                        if let Some(entry) = st.worker(&w) {
                            entry.job = None;
                        }
                    }
                }
                Effect::EndJob { state, error } => {
                    if let Some(job) = st.jobs.get_mut(&n) {
                        job.trace.end(state.as_str());
                        let generation = job.machine.generation().0;
                        match &error {
                            Some(e) => {
                                warn!(job = %job.id, generation, error = %e, "job failed")
                            }
                            None => {
                                info!(job = %job.id, generation, state = state.as_str(), "job ended")
                            }
                        }
                    }
                }
                e @ Effect::WriteCheckpoint { .. } => deferred.push(e),
                Effect::ConfirmLater { event } => {
                    // A report about this generation: by the time it is looked at again,
                    // a newer generation must not be blamed for it.
                    let g = st.jobs.get(&n).map(|j| j.machine.generation());
                    self.later_in(n, SUSPECT_GRACE, *event, g)
                }
            }
        }
        if let Some(job) = st.jobs.get(&n) {
            publish(job);
        }
        self.persist_job(st, n);
        deferred
    }

    /// Feeds `event` to job `n` after `wait`, from a tracked task.
    fn later(&self, n: u64, wait: std::time::Duration, event: Event) {
        self.later_in(n, wait, event, None)
    }

    /// [`Coordinator::later`], dropped when the job has moved past `generation` by then.
    fn later_in(
        &self,
        n: u64,
        wait: std::time::Duration,
        event: Event,
        generation: Option<Generation>,
    ) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = closing.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let mut st = me.lock();
            if let Some(g) = generation {
                if st.jobs.get(&n).map(|j| j.machine.generation()) != Some(g) {
                    return;
                }
            }
            me.apply(&mut st, n, event);
            me.settle(&mut st);
        });
    }

    /// Sends every member its assignment for the generation, with a fresh ring token.
    fn send_assignments(
        &self,
        st: &mut State,
        n: u64,
        start: &GenerationStart,
        members: &[WorkerId],
    ) -> Result<(), String> {
        let generation = start.generation;
        let Some(job) = st.jobs.get_mut(&n) else {
            return Ok(());
        };
        let trace_context = job
            .trace
            .start_generation(&job.id, generation.0, members.len());
        let (id, plan_json) = (job.id.clone(), job.plan_json.clone());
        let mut peers = Vec::new();
        let mut data_peers = Vec::new();
        let mut data_locals = Vec::new();
        for m in members {
            let w = st
                .worker(m)
                .ok_or_else(|| format!("worker {m} left before its assignment was sent"))?;
            peers.push(w.addr.clone());
            data_peers.push(w.data_addr.clone());
            data_locals.push(w.data_local.clone());
        }
        // Plain-socket data plane only when configured and every member offers one; the
        // token is fresh per generation, so a stale or foreign connection is refused.
        let use_sockets = self.config.data_plane == crate::config::DataPlane::Tcp
            && data_peers.iter().all(|d| !d.is_empty());
        let (data_peers, data_locals, ring_token) = if use_sockets {
            let token = random_bytes::<16>()
                .map_err(|e| format!("cannot draw the generation's ring token: {e}"))?;
            (data_peers, data_locals, token.to_vec())
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        for (rank, m) in members.iter().enumerate() {
            if let Some(w) = st.worker(m) {
                w.job = Some(id.clone());
            }
            let a = Assignment {
                job_id: id.0.clone(),
                generation: generation.0,
                rank: rank as u32,
                world: members.len() as u32,
                peers: peers.clone(),
                plan_json: plan_json.clone(),
                data_peers: data_peers.clone(),
                ring_token: ring_token.clone().into(),
                data_locals: data_locals.clone(),
                state_floor: start.state_floor.0,
                checkpoint_step: start.checkpoint.map(|c| c.0).unwrap_or(0),
                trace_context: trace_context.clone(),
            };
            if !st.send_control(m, control_message::Kind::Assignment(a)) {
                return Err(format!(
                    "could not deliver generation {generation}'s assignment to worker {m} (rank {rank})"
                ));
            }
        }
        Ok(())
    }

    /// Drops unreachable workers (feeding their loss to their jobs), then starts every
    /// waiting job that now has enough idle workers. Called at the end of every public
    /// operation that may have changed membership or freed workers.
    fn settle(&self, st: &mut State) {
        loop {
            while let Some(id) = st.unreachable.pop() {
                self.forget_worker(st, &id);
            }
            self.schedule(st);
            if st.unreachable.is_empty() {
                break;
            }
        }
    }

    /// Offers idle workers to waiting jobs, oldest job first. A job that cannot start
    /// blocks later ones (FIFO: a later, smaller job does not jump the queue).
    fn schedule(&self, st: &mut State) {
        let waiting: Vec<u64> = st
            .jobs
            .iter()
            .filter(|(_, j)| matches!(j.machine.state(), JobState::Submitted | JobState::Waiting))
            .map(|(n, _)| *n)
            .collect();
        for n in waiting {
            let idle: Vec<WorkerId> = st
                .workers
                .values()
                .filter(|(_, w)| w.job.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            self.apply(st, n, Event::WorkersAvailable { idle });
            if st.jobs.get(&n).map(|j| j.machine.state()) == Some(JobState::Waiting) {
                return;
            }
        }
        // Workers nobody waits for may join running elastic jobs (oldest first); the
        // machine drains a generation only when it has room.
        let idle: Vec<WorkerId> = st
            .workers
            .values()
            .filter(|(_, w)| w.job.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        let running: Vec<u64> = st
            .jobs
            .iter()
            .filter(|(_, j)| {
                let (_, max) = j.machine.range();
                j.machine.state() == JobState::Running && j.machine.members().len() < max
            })
            .map(|(n, _)| *n)
            .collect();
        for n in running {
            self.apply(st, n, Event::WorkersAvailable { idle: idle.clone() });
        }
    }

    // ------------------------------------------------------------------ jobs

    /// Parses and validates a job file and (with `load`) loads its data: everything a
    /// job entry needs besides its id and run directory. A finished job restored from
    /// the store needs no data.
    async fn prepare(
        &self,
        req: &SubmitRequest,
        load: bool,
        spent: ringtrain_core::privacy::Spent,
    ) -> Result<Prepared, CoordinatorError> {
        let source = if req.source.is_empty() {
            "job".to_string()
        } else {
            req.source.clone()
        };
        let base = PathBuf::from(if req.base_dir.is_empty() {
            "."
        } else {
            &req.base_dir
        });
        let mut file = JobFile::parse(&req.spec_toml, &source)?;
        if req.workers > 0 {
            file.workers = crate::job_file::Workers::Exactly(req.workers);
        }
        file.bind_uploads(&uploads::bindings(&req.uploaded), &source)?;
        let roots = DataRoots {
            base: &base,
            coordinator: Some(&self.config.data_dir),
        };
        if load {
            file.validate(&source, &roots)?;
            file.check_fits(&source, self.config.max_model_bytes)?;
        }
        let file = file.resolved(&roots);
        let data = if load {
            let f = file.clone();
            let src = source.clone();
            tokio::task::spawn_blocking(move || load_data(&f, &src))
                .await
                .map_err(|e| CoordinatorError::Transport(e.to_string()))??
        } else {
            JobData::empty()
        };
        let spec_hash = {
            let canon = serde_json::to_vec(&file)
                .map_err(|e| CoordinatorError::Serialize(e.to_string()))?;
            Sha256::digest(&canon)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let plan = file.training_plan(PlanData {
            train_samples: data.train.rows(),
            validation_samples: data.validation.rows(),
            test_samples: data.test.as_ref().map(|t| t.rows()).unwrap_or(0),
            features: data.train.features,
            collective_timeout_ms: self.config.collective_timeout.as_millis() as u64,
            target_center: if file.train.loss.is_classification() {
                0.0
            } else {
                data.train.y.iter().map(|&v| v as f64).sum::<f64>()
                    / data.train.rows().max(1) as f64
            },
            max_steps: (req.max_steps > 0).then_some(req.max_steps),
        });
        let mut plan = plan;
        let (privacy, privacy_status) = if load {
            let start = spent.step;
            match privacy::plan(&file, &source, data.train.rows(), spent)? {
                Some(run) => {
                    plan.privacy = Some(run.plan);
                    let report = privacy::report_at(run.clone(), start).await?;
                    if run.plan.deterministic_noise {
                        warn!(job = %file.name, "privacy.deterministic_noise is on: the noise is reproducible from the job seed; for tests only, it gives no privacy");
                    }
                    info!(
                        job = %file.name,
                        noise_multiplier = run.plan.noise_multiplier,
                        sample_rate = run.plan.sample_rate,
                        planned_epsilon = run.planned_epsilon,
                        budget_steps = ?run.plan.budget_steps,
                        "DP-SGD planned"
                    );
                    let st = privacy::status(&report, run.plan.budget_steps, false);
                    (Some(run), Some(st))
                }
                None => (None, None),
            }
        } else {
            (None, None)
        };
        let plan_json = serde_json::to_string(&plan)
            .map_err(|e| CoordinatorError::Serialize(format!("the training plan: {e}")))?;
        Ok(Prepared {
            source,
            base,
            file,
            data,
            spec_hash,
            plan,
            plan_json,
            privacy,
            privacy_status,
        })
    }

    /// Parses, validates and loads a job, then queues it. With `resume_dir`, the job
    /// continues the run in that directory from its newest checkpoint that verifies.
    pub async fn submit(self: &Arc<Self>, req: SubmitRequest) -> Result<JobId, CoordinatorError> {
        let resume = if req.resume_dir.is_empty() {
            None
        } else {
            let r = req.clone();
            let limit = self.config.max_model_bytes;
            let data_dir = self.config.data_dir.clone();
            let plan =
                tokio::task::spawn_blocking(move || resume::plan_resume(&r, limit, &data_dir))
                    .await
                    .map_err(|e| CoordinatorError::Transport(e.to_string()))??;
            for s in &plan.skipped {
                warn!(run = %plan.run_dir.display(), problem = %s, "skipped a checkpoint that does not verify");
            }
            Some(plan)
        };
        let req = match &resume {
            Some(plan) => SubmitRequest {
                spec_toml: plan.spec_toml.clone(),
                source: plan.source.clone(),
                base_dir: plan.base_dir.clone(),
                out_dir: plan.run_dir.display().to_string(),
                workers: plan.workers,
                max_steps: plan.max_steps,
                resume_dir: req.resume_dir.clone(),
                uploaded: uploads::to_proto(&plan.uploaded),
            },
            None => req,
        };
        let spent = resume.as_ref().map(|p| p.spent.clone()).unwrap_or_default();
        let Prepared {
            source,
            base,
            file,
            data,
            spec_hash,
            plan,
            plan_json,
            privacy,
            privacy_status,
        } = self.prepare(&req, true, spent).await?;
        if let (Some(run), Some(r)) = (&privacy, &resume) {
            privacy::check_resume(run, &file, &source, r.saved_epochs, r.checkpoint_step)?;
        }
        let n = {
            let mut st = self.lock();
            st.next_job += 1;
            st.next_job
        };
        let id = JobId(format!("j-{n}-{}", self.epoch_tag));
        let out_dir = if req.out_dir.is_empty() {
            self.config
                .data_dir
                .join("runs")
                .join(format!("{}-{}", file.name, id))
        } else {
            PathBuf::from(&req.out_dir)
        };
        // The run directory keeps the job file (so `--resume` needs none); a resume
        // first trims what came after its checkpoint. Blocking file I/O, off the runtime.
        {
            let dir = out_dir.clone();
            let saved = (
                req.spec_toml.clone(),
                source.clone(),
                base.display().to_string(),
                req.workers,
                req.max_steps,
                uploads::bindings(&req.uploaded),
            );
            let plan = resume.clone();
            tokio::task::spawn_blocking(move || match plan {
                Some(p) => resume::begin_resume(&p),
                None => resume::save_job_file(
                    &dir, &saved.0, &saved.1, &saved.2, saved.3, saved.4, &saved.5,
                ),
            })
            .await
            .map_err(|e| CoordinatorError::Transport(e.to_string()))??;
        }
        let mut st = self.lock();
        st.job_index.insert(id.clone(), n);
        let total_steps =
            (plan.steps_per_epoch() as u64 * plan.epochs as u64).min(plan.step_limit());
        let mut status = JobStatus {
            job_id: id.0.clone(),
            name: file.name.clone(),
            state: JobState::Submitted.as_str().into(),
            workers: file.workers.max(),
            workers_min: file.workers.min(),
            workers_max: file.workers.max(),
            epochs: file.epochs,
            total_steps,
            out_dir: out_dir.display().to_string(),
            metrics: Some(Metrics::default()),
            privacy: privacy_status,
            ..JobStatus::default()
        };
        let store = CheckpointStore::new(out_dir.join("checkpoints"), file.checkpoint.keep);
        info!(job = %id, name = %file.name, workers = %file.workers, "job submitted");
        let (first, first_reason, checkpoint) = match &resume {
            Some(plan) => {
                status.step = plan.checkpoint_step;
                status.epoch = plan.checkpoint_epochs;
                status.history = plan.history.clone();
                (
                    StartKind::Resumed,
                    format!(
                        "resumed from the checkpoint at step {} in {}",
                        plan.checkpoint_step,
                        plan.run_dir.display()
                    ),
                    Some(ringtrain_core::Step(plan.checkpoint_step)),
                )
            }
            None => (StartKind::Start, "job started".to_string(), None),
        };
        let trace = trace::JobTrace::start(&id, &file.name);
        let entry = JobEntry {
            id: id.clone(),
            request: SubmitRequest {
                out_dir: out_dir.display().to_string(),
                resume_dir: String::new(),
                ..req.clone()
            },
            persisted: None,
            waiting: BTreeMap::new(),
            machine: JobMachine::with_config(MachineConfig {
                min: file.workers.min() as usize,
                max: file.workers.max() as usize,
                policy: LossPolicy::NewGeneration,
                max_restarts: file.fault.max_restarts,
                first,
                first_reason,
                checkpoint,
            }),
            file,
            spec_hash,
            plan,
            plan_json,
            data: Arc::new(data),
            status: watch::channel(status).0,
            out_dir,
            store,
            trace,
            privacy,
        };
        st.jobs.insert(n, entry);
        self.persist_job(&mut st, n);
        self.settle(&mut st);
        Ok(id)
    }

    /// The job's current status.
    pub fn get(&self, id: &str) -> Result<JobStatus, CoordinatorError> {
        Ok(self.lock().job(id)?.status.borrow().clone())
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<JobStatus> {
        self.lock()
            .jobs
            .values()
            .map(|j| j.status.borrow().clone())
            .collect()
    }

    /// A receiver that sees every status change of the job.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<JobStatus>, CoordinatorError> {
        Ok(self.lock().job(id)?.status.subscribe())
    }

    /// Cancels a job; a running job's workers are told to stop and become free.
    pub fn cancel(&self, id: &str) -> Result<JobStatus, CoordinatorError> {
        let mut st = self.lock();
        let n = st.job_number(id)?;
        if !st.job(id)?.machine.state().is_terminal() {
            info!(job = %id, "job cancelled by user");
        }
        self.apply(&mut st, n, Event::Cancel);
        self.settle(&mut st);
        let status = st.job(id)?.status.borrow().clone();
        Ok(status)
    }

    /// Fails a job from outside the cluster (e.g. `ringtrain local` when a worker
    /// process died before it could attach).
    pub fn fail(&self, id: &str, message: String) -> Result<JobStatus, CoordinatorError> {
        let mut st = self.lock();
        let n = st.job_number(id)?;
        self.apply(&mut st, n, Event::Fault { message });
        self.settle(&mut st);
        let status = st.job(id)?.status.borrow().clone();
        Ok(status)
    }

    /// Checks that a worker's message belongs to the job's current generation and rank;
    /// returns the job's number.
    fn member(
        st: &mut State,
        job_id: &str,
        generation: u64,
        rank: u32,
        worker_id: &str,
    ) -> Result<u64, CoordinatorError> {
        let n = st.job_number(job_id)?;
        let job = st.job(job_id)?;
        job.machine
            .check_member(
                Generation(generation),
                Rank(rank),
                &WorkerId::from(worker_id),
            )
            .map_err(|e| CoordinatorError::Precondition(format!("job {job_id}: {e}")))?;
        Ok(n)
    }
}

/// Publishes the machine's view of a job (state, generation, members, verified steps,
/// events, error) into its status; watchers see a change only when something did change.
fn publish(job: &JobEntry) {
    let m = &job.machine;
    // Called on every report: compare field by field, never clone the whole status (its
    // history grows with the run).
    job.status.send_if_modified(|s| {
        let mut changed = false;
        let mut set = |changed_now: bool| changed |= changed_now;
        let state = m.state().as_str();
        set(s.state != state);
        if s.state != state {
            s.state = state.into();
        }
        set(s.generation != m.generation().0);
        s.generation = m.generation().0;
        let members = m.members();
        if !members.is_empty()
            && (s.worker_ids.len() != members.len()
                || s.worker_ids.iter().zip(members).any(|(a, b)| *a != b.0))
        {
            s.worker_ids = members.iter().map(|w| w.0.clone()).collect();
            s.workers = members.len() as u32;
            set(true);
        }
        let (min, max) = m.range();
        set((s.workers_min, s.workers_max) != (min as u32, max as u32));
        s.workers_min = min as u32;
        s.workers_max = max as u32;
        set(s.verified_steps != m.verified_steps());
        s.verified_steps = m.verified_steps();
        if let Some(e) = m.error() {
            if s.error != e {
                s.error = e.to_string();
                set(true);
            }
        }
        if s.events.len() != m.events().len()
            || s.events.last().map(|e| e.step) != m.events().last().map(|e| e.step.0)
        {
            s.events = m
                .events()
                .iter()
                .map(|e| GenerationEvent {
                    generation: e.generation.0,
                    kind: e.kind.as_str().into(),
                    reason: e.reason.clone(),
                    step: e.step.0,
                    workers: e.workers,
                })
                .collect();
            set(true);
        }
        if m.state() != JobState::Running && !s.stalled.is_empty() {
            s.stalled.clear();
            set(true);
        }
        changed
    });
}

/// `N` bytes from the operating system's CSPRNG (ring tokens, id tags).
fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
