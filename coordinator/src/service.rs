//! The coordinator's core: jobs, workers, scheduling, reports, checkpoints.
//!
//! State lives behind one `std::sync::Mutex`: every section is short bookkeeping and none
//! is held across an `.await` (file writes and data loading run on blocking threads,
//! outside the lock). Workers are reached through their attach streams.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ringtrain_proto::v1::{
    control_message, worker_report, Assignment, CancelJob, CheckpointUpload, ControlMessage,
    EpochSummary, JobStatus, Metrics, Registered, ShardChunk, ShardRequest, Shutdown, Split,
    SubmitRequest, WorkerReport,
};
use ringtrain_worker::plan::TrainingPlan;
use ringtrain_worker::sharding;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tonic::Status;
use tracing::{info, info_span, warn};

use crate::checkpoint::{tensors_bytes, CheckpointMeta, CheckpointStore, TrainingState};
use crate::config::ServerConfig;
use crate::dataset::{Dataset, Normalization};
use crate::error::{CoordinatorError, SpecError};
use crate::job_file::JobFile;
use crate::jobs::{JobId, JobState, ReplicaCheck, WorkerId};

/// Control messages buffered per worker.
const CONTROL_CAPACITY: usize = 16;
/// Rows per shard message.
const SHARD_ROWS: usize = 2048;

/// What the attach stream carries.
pub type ControlStream = mpsc::Receiver<Result<ControlMessage, Status>>;

/// A job's datasets, held for its lifetime.
#[derive(Debug)]
pub struct JobData {
    train: Dataset,
    validation: Dataset,
    test: Option<Dataset>,
    normalization: Normalization,
}

#[derive(Debug)]
struct WorkerEntry {
    addr: String,
    data_addr: String,
    name: String,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
    job: Option<JobId>,
}

#[derive(Debug)]
struct JobEntry {
    file: JobFile,
    spec_hash: String,
    plan: TrainingPlan,
    data: Arc<JobData>,
    state: JobState,
    generation: u64,
    members: Vec<WorkerId>,
    replica: ReplicaCheck,
    status: watch::Sender<JobStatus>,
    out_dir: PathBuf,
    store: CheckpointStore,
    final_checkpoint: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<u64, (JobId, JobEntry)>,
    job_index: std::collections::HashMap<String, u64>,
    workers: BTreeMap<u64, (WorkerId, WorkerEntry)>,
    next_job: u64,
    next_worker: u64,
}

impl State {
    fn job(&mut self, id: &str) -> Result<&mut JobEntry, CoordinatorError> {
        let n = *self
            .job_index
            .get(id)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.to_string()))?;
        self.jobs
            .get_mut(&n)
            .map(|(_, j)| j)
            .ok_or_else(|| CoordinatorError::UnknownJob(id.to_string()))
    }

    fn worker(&mut self, id: &WorkerId) -> Option<&mut WorkerEntry> {
        parse_num(&id.0, "w-")
            .and_then(|n| self.workers.get_mut(&n))
            .map(|(_, w)| w)
    }
}

fn parse_num(id: &str, prefix: &str) -> Option<u64> {
    id.strip_prefix(prefix)?.parse().ok()
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
}

impl Coordinator {
    /// A coordinator with no jobs and no workers.
    pub fn new(config: ServerConfig) -> Arc<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let epoch_tag = format!(
            "{:04x}",
            (nanos as u64 ^ (nanos >> 64) as u64 ^ std::process::id() as u64) & 0xffff
        );
        Arc::new(Coordinator {
            config,
            epoch_tag,
            state: Mutex::new(State::default()),
            tasks: TaskTracker::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves bookkeeping that is still consistent
        // enough to report on; keep serving rather than poisoning every later call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Background tasks (attach watchers), for a bounded shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    // ------------------------------------------------------------------ jobs

    /// Parses, validates and loads a job, then queues it.
    pub async fn submit(self: &Arc<Self>, req: SubmitRequest) -> Result<JobId, CoordinatorError> {
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
            file.workers = req.workers;
        }
        file.validate(&source, &base)?;
        let file = file.resolved(&base);
        let data = {
            let f = file.clone();
            let src = source.clone();
            tokio::task::spawn_blocking(move || load_data(&f, &src))
                .await
                .map_err(|e| CoordinatorError::Transport(e.to_string()))??
        };
        let spec_hash = {
            let canon = serde_json::to_vec(&file)
                .map_err(|e| CoordinatorError::Serialize(e.to_string()))?;
            Sha256::digest(&canon)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let plan = TrainingPlan {
            name: file.name.clone(),
            seed: file.seed,
            epochs: file.epochs,
            batch_size: file.batch_size,
            model: file.model.clone(),
            loss: file.train.loss,
            metrics: file.train.metrics.clone(),
            optimizer: file.train.optimizer,
            schedule: file.train.schedule,
            warmup_steps: file.train.warmup_steps,
            clip_norm: file.train.clip_norm,
            early_stopping: file.train.early_stopping.clone(),
            checkpoint_every: file.checkpoint.every_steps,
            train_samples: data.train.rows(),
            validation_samples: data.validation.rows(),
            test_samples: data.test.as_ref().map(|t| t.rows()).unwrap_or(0),
            features: data.train.features,
            collective_timeout_ms: self.config.collective_timeout.as_millis() as u64,
            max_steps: (req.max_steps > 0).then_some(req.max_steps),
            target_center: if file.train.loss.is_classification() {
                0.0
            } else {
                data.train.y.iter().map(|&v| v as f64).sum::<f64>()
                    / data.train.rows().max(1) as f64
            },
        };
        let mut st = self.lock();
        st.next_job += 1;
        let n = st.next_job;
        let id = JobId(format!("j-{n}-{}", self.epoch_tag));
        st.job_index.insert(id.0.clone(), n);
        let out_dir = if req.out_dir.is_empty() {
            self.config
                .data_dir
                .join("runs")
                .join(format!("{}-{}", file.name, id))
        } else {
            PathBuf::from(&req.out_dir)
        };
        let mut total_steps = plan.steps_per_epoch() as u64 * plan.epochs as u64;
        if let Some(m) = plan.max_steps {
            total_steps = total_steps.min(m);
        }
        let status = JobStatus {
            job_id: id.0.clone(),
            name: file.name.clone(),
            state: JobState::Submitted.as_str().into(),
            workers: file.workers,
            epochs: file.epochs,
            total_steps,
            out_dir: out_dir.display().to_string(),
            metrics: Some(Metrics::default()),
            ..JobStatus::default()
        };
        let store = CheckpointStore::new(out_dir.join("checkpoints"), file.checkpoint.keep);
        info!(job = %id, name = %file.name, workers = file.workers, "job submitted");
        let entry = JobEntry {
            replica: ReplicaCheck::new(file.workers as usize),
            file,
            spec_hash,
            plan,
            data: Arc::new(data),
            state: JobState::Submitted,
            generation: 0,
            members: Vec::new(),
            status: watch::channel(status).0,
            out_dir,
            store,
            final_checkpoint: None,
        };
        st.jobs.insert(n, (id.clone(), entry));
        self.schedule(&mut st);
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
            .map(|(_, j)| j.status.borrow().clone())
            .collect()
    }

    /// A receiver that sees every status change of the job.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<JobStatus>, CoordinatorError> {
        Ok(self.lock().job(id)?.status.subscribe())
    }

    /// Cancels a job; a running job's workers are told to stop and become free.
    pub fn cancel(&self, id: &str) -> Result<JobStatus, CoordinatorError> {
        let mut st = self.lock();
        let state = st.job(id)?.state;
        if !state.is_terminal() {
            info!(job = %id, "job cancelled by user");
            self.end_job(&mut st, id, JobState::Cancelled, None);
            self.schedule(&mut st);
        }
        let status = st.job(id)?.status.borrow().clone();
        Ok(status)
    }

    /// Moves a job to a terminal state, releasing (and, unless it completed, cancelling)
    /// its workers.
    fn end_job(&self, st: &mut State, id: &str, state: JobState, error: Option<String>) {
        let Ok(job) = st.job(id) else { return };
        if job.state.is_terminal() || !job.state.can_move_to(state) {
            return;
        }
        job.state = state;
        let members = std::mem::take(&mut job.members);
        let generation = job.generation;
        job.status.send_modify(|s| {
            s.state = state.as_str().into();
            if let Some(e) = &error {
                s.error = e.clone();
            }
        });
        match (&error, state) {
            (Some(e), _) => warn!(job = %id, generation, error = %e, "job failed"),
            (None, s) => info!(job = %id, generation, state = s.as_str(), "job ended"),
        }
        for w in members {
            if let Some(worker) = st.worker(&w) {
                worker.job = None;
                if state != JobState::Completed {
                    let msg = ControlMessage {
                        kind: Some(control_message::Kind::Cancel(CancelJob {
                            job_id: id.to_string(),
                            generation,
                            reason: state.as_str().into(),
                        })),
                    };
                    let _ = worker.tx.try_send(Ok(msg));
                }
            }
        }
    }

    /// Starts every waiting job that now has enough idle workers (FIFO).
    fn schedule(&self, st: &mut State) {
        let waiting: Vec<u64> = st
            .jobs
            .iter()
            .filter(|(_, (_, j))| matches!(j.state, JobState::Submitted | JobState::Waiting))
            .map(|(n, _)| *n)
            .collect();
        for n in waiting {
            let idle: Vec<u64> = st
                .workers
                .iter()
                .filter(|(_, (_, w))| w.job.is_none())
                .map(|(k, _)| *k)
                .collect();
            let Some((id, job)) = st.jobs.get_mut(&n) else {
                continue;
            };
            let id = id.clone();
            let need = job.file.workers as usize;
            if idle.len() < need {
                if job.state == JobState::Submitted {
                    job.state = JobState::Waiting;
                    job.status
                        .send_modify(|s| s.state = JobState::Waiting.as_str().into());
                }
                // FIFO: a later, smaller job does not jump the queue.
                break;
            }
            let chosen = &idle[..need];
            let plan_json = match serde_json::to_string(&job.plan) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("cannot encode the training plan: {e}");
                    self.end_job(st, &id.0, JobState::Failed, Some(msg));
                    continue;
                }
            };
            job.generation += 1;
            job.state = JobState::Running;
            job.replica = ReplicaCheck::new(need);
            let generation = job.generation;
            let mut members = Vec::new();
            let mut peers = Vec::new();
            let mut data_peers = Vec::new();
            for k in chosen {
                if let Some((wid, w)) = st.workers.get(k) {
                    members.push(wid.clone());
                    peers.push(w.addr.clone());
                    data_peers.push(w.data_addr.clone());
                }
            }
            // TCP data plane only when configured and every member offers one; the token
            // is fresh per generation, so a stale or foreign connection is refused.
            let use_tcp = self.config.data_plane == crate::config::DataPlane::Tcp
                && data_peers.iter().all(|d| !d.is_empty());
            let (data_peers, ring_token) = if use_tcp {
                (data_peers, random_token().to_vec())
            } else {
                (Vec::new(), Vec::new())
            };
            let Some((_, job)) = st.jobs.get_mut(&n) else {
                continue;
            };
            job.members = members.clone();
            job.status.send_modify(|s| {
                s.state = JobState::Running.as_str().into();
                s.generation = generation;
                s.worker_ids = members.iter().map(|m| m.0.clone()).collect();
            });
            info!(job = %id, generation, workers = ?members, "job started");
            for (rank, k) in chosen.iter().enumerate() {
                if let Some((_, w)) = st.workers.get_mut(k) {
                    w.job = Some(id.clone());
                    let a = Assignment {
                        job_id: id.0.clone(),
                        generation,
                        rank: rank as u32,
                        world: need as u32,
                        peers: peers.clone(),
                        plan_json: plan_json.clone(),
                        data_peers: data_peers.clone(),
                        ring_token: ring_token.clone().into(),
                    };
                    let _ = w.tx.try_send(Ok(ControlMessage {
                        kind: Some(control_message::Kind::Assignment(a)),
                    }));
                }
            }
        }
    }

    // ------------------------------------------------------------------ workers

    /// Registers a worker; the returned stream carries its control messages. When the
    /// worker goes away (the stream is dropped), it is detached.
    pub fn attach(
        self: &Arc<Self>,
        addr: String,
        name: String,
        data_addr: String,
    ) -> ControlStream {
        let (tx, rx) = mpsc::channel(CONTROL_CAPACITY);
        let mut st = self.lock();
        st.next_worker += 1;
        let n = st.next_worker;
        let id = WorkerId(format!("w-{n}"));
        info!(worker = %id, addr = %addr, name = %name, "worker attached");
        let _ = tx.try_send(Ok(ControlMessage {
            kind: Some(control_message::Kind::Registered(Registered {
                worker_id: id.0.clone(),
            })),
        }));
        let watcher = tx.clone();
        st.workers.insert(
            n,
            (
                id.clone(),
                WorkerEntry {
                    addr,
                    data_addr,
                    name,
                    tx,
                    job: None,
                },
            ),
        );
        self.schedule(&mut st);
        drop(st);
        let me = Arc::clone(self);
        self.tasks.spawn(async move {
            watcher.closed().await;
            me.detach(&id);
        });
        rx
    }

    /// Forgets a worker; a job it was running fails, naming it.
    pub fn detach(&self, id: &WorkerId) {
        let mut st = self.lock();
        let Some(n) = parse_num(&id.0, "w-") else {
            return;
        };
        let Some((_, w)) = st.workers.remove(&n) else {
            return;
        };
        if w.job.is_none() {
            info!(worker = %id, addr = %w.addr, name = %w.name, "worker detached");
        }
        if let Some(job_id) = w.job {
            warn!(worker = %id, addr = %w.addr, name = %w.name, job = %job_id, "worker lost while running a job");
            if let Ok(job) = st.job(&job_id.0) {
                let rank = job.members.iter().position(|m| m == id).unwrap_or(0);
                let msg = format!(
                    "worker {id} (rank {rank}, {}) was lost in generation {}",
                    w.addr, job.generation
                );
                self.end_job(&mut st, &job_id.0, JobState::Failed, Some(msg));
            }
        }
        self.schedule(&mut st);
    }

    /// Tells every attached worker to exit (used by `ringtrain local` on the way out).
    pub fn shutdown_workers(&self) {
        let st = self.lock();
        for (_, w) in st.workers.values() {
            let _ = w.tx.try_send(Ok(ControlMessage {
                kind: Some(control_message::Kind::Shutdown(Shutdown {})),
            }));
        }
    }

    /// Number of attached workers.
    pub fn worker_count(&self) -> usize {
        self.lock().workers.len()
    }

    /// Checks that a worker's message belongs to the job's current generation and rank.
    fn member<'a>(
        st: &'a mut State,
        job_id: &str,
        generation: u64,
        rank: u32,
        worker_id: &str,
    ) -> Result<&'a mut JobEntry, CoordinatorError> {
        let job = st.job(job_id)?;
        if job.state != JobState::Running || job.generation != generation {
            return Err(CoordinatorError::Precondition(format!(
                "job {job_id} is {} in generation {}, not running generation {generation}",
                job.state.as_str(),
                job.generation
            )));
        }
        match job.members.get(rank as usize) {
            Some(w) if w.0 == worker_id => Ok(job),
            _ => Err(CoordinatorError::Precondition(format!(
                "worker {worker_id} is not rank {rank} of job {job_id} generation {generation}"
            ))),
        }
    }

    /// Handles one report from a worker.
    pub fn report(&self, r: WorkerReport) {
        let mut st = self.lock();
        let job = match Self::member(&mut st, &r.job_id, r.generation, r.rank, &r.worker_id) {
            Ok(j) => j,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring stale report");
                return;
            }
        };
        match r.kind {
            Some(worker_report::Kind::Step(s)) => {
                if s.step == 0 {
                    tracing::debug!("ignoring a step report for step 0");
                    return;
                }
                if let Err(d) = job.replica.record(s.step, r.rank, s.param_hash) {
                    self.end_job(&mut st, &r.job_id, JobState::Failed, Some(d.to_string()));
                    self.schedule(&mut st);
                    return;
                }
                let verified = job.replica.verified();
                let spe = job.plan.steps_per_epoch().max(1) as u64;
                if r.rank == 0 {
                    job.status.send_modify(|st| {
                        st.step = s.step;
                        st.epoch = ((s.step - 1) / spe) as u32;
                        st.verified_steps = verified;
                        let m = st.metrics.get_or_insert_with(Metrics::default);
                        m.loss = Some(s.loss);
                        m.accuracy = Some(s.accuracy);
                    });
                } else {
                    job.status.send_if_modified(|st| {
                        let changed = st.verified_steps != verified;
                        st.verified_steps = verified;
                        changed
                    });
                }
            }
            Some(worker_report::Kind::Epoch(e)) => {
                let Some(summary) = e.summary else { return };
                append_metrics(&job.out_dir, &summary);
                job.status.send_modify(|st| {
                    st.epoch = summary.epoch;
                    let m = st.metrics.get_or_insert_with(Metrics::default);
                    m.loss = Some(summary.loss);
                    m.accuracy = summary.metrics.get("accuracy").copied();
                    m.val_loss = summary.val_loss;
                    m.val_accuracy = summary.val_accuracy;
                    for (k, v) in &summary.metrics {
                        if !matches!(
                            k.as_str(),
                            "loss" | "accuracy" | "val_loss" | "val_accuracy"
                        ) {
                            m.other.insert(k.clone(), *v);
                        }
                    }
                    st.history.push(summary.clone());
                    let (n, secs) = st.history.iter().fold((0.0, 0.0), |(n, t), h| {
                        (n + h.samples_per_sec * h.seconds, t + h.seconds)
                    });
                    st.samples_per_sec = if secs > 0.0 { n / secs } else { 0.0 };
                });
            }
            Some(worker_report::Kind::Failure(f)) => {
                let msg = match f
                    .lost_rank
                    .and_then(|lr| job.members.get(lr as usize).map(|w| (lr, w)))
                {
                    Some((lr, w)) => format!(
                        "worker {w} (rank {lr}) was lost in generation {}: rank {} reports: {}",
                        job.generation, r.rank, f.message
                    ),
                    None => format!(
                        "rank {} (worker {}) failed in generation {}: {}",
                        r.rank, r.worker_id, job.generation, f.message
                    ),
                };
                self.end_job(&mut st, &r.job_id, JobState::Failed, Some(msg));
                self.schedule(&mut st);
            }
            Some(worker_report::Kind::Finished(f)) => {
                if r.rank != 0 {
                    return;
                }
                if job.final_checkpoint.is_none() {
                    let msg = "rank 0 finished without uploading the final checkpoint".to_string();
                    self.end_job(&mut st, &r.job_id, JobState::Failed, Some(msg));
                } else {
                    // Fewer epochs than planned means early stopping, unless a step limit
                    // (benchmarks) cut the run short.
                    let early = job.plan.max_steps.is_none() && f.epochs < job.file.epochs;
                    job.status.send_modify(|st| {
                        st.step = f.steps;
                        st.timing = f.timing.clone();
                        if early {
                            st.stopped_epoch = f.epochs;
                        }
                        let m = st.metrics.get_or_insert_with(Metrics::default);
                        m.test_loss = f.test_loss;
                        m.test_accuracy = f.test_accuracy;
                        for (k, v) in &f.test_metrics {
                            if !matches!(k.as_str(), "test_loss" | "test_accuracy") {
                                m.other.insert(k.clone(), *v);
                            }
                        }
                    });
                    self.end_job(&mut st, &r.job_id, JobState::Completed, None);
                }
                self.schedule(&mut st);
            }
            None => {}
        }
    }

    /// Stores a checkpoint from rank 0; the final one also writes the run's model files.
    pub async fn upload_checkpoint(
        &self,
        u: CheckpointUpload,
    ) -> Result<PathBuf, CoordinatorError> {
        let (store, meta, out_dir, info) = {
            let mut st = self.lock();
            let job = Self::member(&mut st, &u.job_id, u.generation, 0, &u.worker_id)?;
            let meta = CheckpointMeta {
                format: "ringtrain.checkpoint.v1".into(),
                job_id: u.job_id.clone(),
                generation: u.generation,
                step: u.step,
                epoch: u.epoch,
                optimizer_t: u.optimizer_t,
                optimizer_slots: u.slots.iter().map(|s| s.name.clone()).collect(),
                spec_hash: job.spec_hash.clone(),
                param_hash: u.param_hash,
                final_: u.r#final,
                model: job.file.model.clone(),
            };
            (
                job.store.clone(),
                meta,
                job.out_dir.clone(),
                ModelInfo {
                    file: job.file.clone(),
                    normalization: job.data.normalization.clone(),
                    feature_names: job.data.train.feature_names.clone(),
                    label_name: job.data.train.label_name.clone(),
                },
            )
        };
        let decode = |b: &[u8], what: &str| -> Result<Vec<f32>, CoordinatorError> {
            if !b.len().is_multiple_of(4) {
                return Err(CoordinatorError::Precondition(format!(
                    "{what} is not a whole number of f32s"
                )));
            }
            Ok(b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let state = TrainingState {
            params: decode(&u.params, "params")?,
            slots: u
                .slots
                .iter()
                .map(|s| decode(&s.data, &s.name))
                .collect::<Result<_, _>>()?,
        };
        let final_ = u.r#final;
        let span = info_span!("checkpoint", job = %u.job_id, step = u.step, final_);
        let path = tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            let path = store.write(&meta, &state)?;
            if final_ {
                write_model(&out_dir, &info, &meta, &state.params)?;
            }
            info!(path = %path.display(), "checkpoint written");
            Ok::<_, CoordinatorError>(path)
        })
        .await
        .map_err(|e| CoordinatorError::Transport(e.to_string()))??;
        if final_ {
            let mut st = self.lock();
            if let Ok(job) = st.job(&u.job_id) {
                job.final_checkpoint = Some(path.clone());
            }
        }
        Ok(path)
    }

    /// The rows of one split a worker should hold, as messages.
    pub fn shard(&self, req: &ShardRequest) -> Result<Vec<ShardChunk>, CoordinatorError> {
        let (data, plan, world) = {
            let mut st = self.lock();
            let job = Self::member(
                &mut st,
                &req.job_id,
                req.generation,
                req.rank,
                &req.worker_id,
            )?;
            (job.data.clone(), job.plan.clone(), job.members.len())
        };
        let rank = req.rank as usize;
        let rows: Vec<u32>;
        let split = Split::try_from(req.split)
            .map_err(|_| CoordinatorError::Precondition(format!("unknown split {}", req.split)))?;
        let set = match split {
            Split::Train => {
                rows = sharding::rank_epoch_indices(
                    plan.seed,
                    req.epoch,
                    data.train.rows(),
                    plan.batch_size,
                    rank,
                    world,
                );
                &data.train
            }
            Split::Validation => {
                let (a, b) = sharding::static_range(data.validation.rows(), rank, world);
                rows = (a as u32..b as u32).collect();
                &data.validation
            }
            Split::Test => {
                let Some(t) = data.test.as_ref() else {
                    return Err(CoordinatorError::Precondition(
                        "this job has no test set".into(),
                    ));
                };
                let (a, b) = sharding::static_range(t.rows(), rank, world);
                rows = (a as u32..b as u32).collect();
                t
            }
        };
        let d = set.features;
        Ok(rows
            .chunks(SHARD_ROWS)
            .map(|idx| {
                let mut x = Vec::with_capacity(idx.len() * d * 4);
                let mut y = Vec::with_capacity(idx.len() * 4);
                for &i in idx {
                    let i = i as usize;
                    x.extend_from_slice(bytemuck::cast_slice(&set.x[i * d..(i + 1) * d]));
                    y.extend_from_slice(&set.y[i].to_le_bytes());
                }
                ShardChunk {
                    rows: idx.len() as u32,
                    features: x.into(),
                    labels: y.into(),
                    indices: bytemuck::cast_slice::<u32, u8>(idx).to_vec().into(),
                }
            })
            .collect())
    }
}

/// 128 bits from the OS-seeded keys of `RandomState` (std has no other entropy source;
/// this is a capability token against stray connections, not key material).
fn random_token() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// What `model.json` says besides the architecture.
#[derive(Debug, Clone)]
struct ModelInfo {
    file: JobFile,
    normalization: Normalization,
    feature_names: Option<Vec<String>>,
    label_name: Option<String>,
}

/// Loads a job's datasets, checks them against the model and normalizes them with
/// statistics of the training split.
fn load_data(file: &JobFile, source: &str) -> Result<JobData, CoordinatorError> {
    let spec_err = |field: &str, message: String| SpecError {
        file: source.to_string(),
        field: field.to_string(),
        message,
    };
    let loss = file.train.loss;
    let classes = loss.metric_classes(file.model.outputs());
    let check = |d: &Dataset, field: &str| -> Result<(), CoordinatorError> {
        if d.features != file.model.input {
            return Err(spec_err(
                "model.input",
                format!(
                    "{} does not match the {} features per sample of {field} (set model.input = {})",
                    file.model.input, d.features, d.features
                ),
            )
            .into());
        }
        if loss.is_classification() {
            d.check_classes(classes, field)?;
        }
        Ok(())
    };
    let full = Dataset::load(&file.data.train, file.seed, 0)?;
    check(&full, "data.train")?;
    let (mut train, mut validation) = if file.data.validation_split > 0.0 {
        full.split_tail(file.data.validation_split)
    } else {
        (full, Dataset::default())
    };
    if train.rows() == 0 {
        return Err(spec_err("data.validation_split", "leaves no training samples".into()).into());
    }
    if let Some(src) = &file.data.validation {
        validation = Dataset::load(src, file.seed, 2)?;
        check(&validation, "data.validation")?;
    }
    let mut test = match &file.data.test {
        Some(src) => {
            let t = Dataset::load(src, file.seed, 1)?;
            check(&t, "data.test")?;
            Some(t)
        }
        None => None,
    };
    let normalization = Normalization::fit(file.data.normalize, &train);
    let d = train.features;
    normalization.apply(&mut train.x, d);
    normalization.apply(&mut validation.x, d);
    if let Some(t) = test.as_mut() {
        normalization.apply(&mut t.x, d);
    }
    Ok(JobData {
        train,
        validation,
        test,
        normalization,
    })
}

fn append_metrics(out_dir: &Path, s: &EpochSummary) {
    let mut line = serde_json::Map::new();
    line.insert("epoch".into(), s.epoch.into());
    let mut keys: Vec<&String> = s.metrics.keys().collect();
    keys.sort();
    for k in keys {
        line.insert(k.clone(), serde_json::json!(s.metrics[k]));
    }
    line.insert(
        "samples_per_sec".into(),
        serde_json::json!(s.samples_per_sec),
    );
    line.insert("seconds".into(), serde_json::json!(s.seconds));
    let res = std::fs::create_dir_all(out_dir).and_then(|_| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out_dir.join("metrics.jsonl"))?;
        writeln!(f, "{}", serde_json::Value::Object(line))
    });
    if let Err(e) = res {
        warn!(dir = %out_dir.display(), error = %e, "cannot append metrics.jsonl");
    }
}

/// Writes `model.safetensors` and `model.json` into the run directory: everything
/// `ringtrain predict` and `evaluate` need.
fn write_model(
    out_dir: &Path,
    info: &ModelInfo,
    meta: &CheckpointMeta,
    params: &[f32],
) -> Result<(), CoordinatorError> {
    let file = &info.file;
    std::fs::create_dir_all(out_dir).map_err(CoordinatorError::io(format!(
        "creating {}",
        out_dir.display()
    )))?;
    let bytes = tensors_bytes(&file.model, &[("", params)])?;
    let tmp = out_dir.join(".model.safetensors.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, out_dir.join("model.safetensors")))
        .map_err(CoordinatorError::io("writing model.safetensors"))?;
    let saved = crate::saved_model::ModelCard {
        format: crate::saved_model::FORMAT.into(),
        name: file.name.clone(),
        model: file.model.clone(),
        loss: file.train.loss,
        metrics: file.train.metrics.clone(),
        classes: file.train.loss.metric_classes(file.model.outputs()),
        normalization: info.normalization.clone(),
        feature_names: info.feature_names.clone(),
        label: info.label_name.clone(),
        trained: crate::saved_model::Provenance {
            job_id: meta.job_id.clone(),
            steps: meta.step,
            epochs: meta.epoch,
            spec_hash: meta.spec_hash.clone(),
        },
    };
    let text = serde_json::to_string_pretty(&saved)
        .map_err(|e| CoordinatorError::Serialize(e.to_string()))?;
    std::fs::write(out_dir.join("model.json"), text)
        .map_err(CoordinatorError::io("writing model.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringtrain_proto::v1::StepReport;

    const JOB: &str = r#"
name = "t"
epochs = 1
batch_size = 8
workers = 2
[data]
train = { format = "synthetic", samples = 64, features = 3, classes = 2 }
[model]
input = 3
layers = [{ dense = 2, activation = "softmax" }]
[train]
loss = "sparse_categorical_crossentropy"
"#;

    fn step(job: &str, rank: u32, worker: &str, hash: u64) -> WorkerReport {
        WorkerReport {
            job_id: job.into(),
            generation: 1,
            rank,
            worker_id: worker.into(),
            kind: Some(worker_report::Kind::Step(StepReport {
                step: 1,
                param_hash: hash,
                ..StepReport::default()
            })),
        }
    }

    async fn running_job() -> (
        Arc<Coordinator>,
        String,
        Vec<ControlStream>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let core = Coordinator::new(ServerConfig {
            data_dir: dir.path().to_path_buf(),
            ..ServerConfig::default()
        });
        let id = core
            .submit(SubmitRequest {
                spec_toml: JOB.into(),
                ..SubmitRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(core.get(&id.0).unwrap().state, "waiting");
        let streams = vec![
            core.attach("a:1".into(), "a".into(), String::new()),
            core.attach("b:1".into(), "b".into(), String::new()),
        ];
        assert_eq!(core.get(&id.0).unwrap().state, "running");
        (core, id.0, streams, dir)
    }

    #[tokio::test]
    async fn a_replica_hash_mismatch_fails_the_job_loudly() {
        let (core, id, mut streams, _dir) = running_job().await;
        core.report(step(&id, 0, "w-1", 0xaaaa));
        core.report(step(&id, 1, "w-2", 0xbbbb));
        let s = core.get(&id).unwrap();
        assert_eq!(s.state, "failed");
        assert!(
            s.error.contains("replicas diverged at step 1"),
            "{}",
            s.error
        );
        // Both workers were told to stop (after their registration and assignment).
        for rx in streams.iter_mut() {
            let mut saw_cancel = false;
            while let Ok(Ok(m)) = rx.try_recv() {
                saw_cancel |= matches!(m.kind, Some(control_message::Kind::Cancel(_)));
            }
            assert!(saw_cancel);
        }
    }

    #[tokio::test]
    async fn agreeing_replicas_are_counted_and_strangers_ignored() {
        let (core, id, _streams, _dir) = running_job().await;
        core.report(step(&id, 0, "w-1", 7));
        // A report from a worker that is not rank 1 of this job is ignored.
        core.report(step(&id, 1, "w-9", 8));
        core.report(step(&id, 1, "w-2", 7));
        let s = core.get(&id).unwrap();
        assert_eq!(s.state, "running");
        assert_eq!(s.verified_steps, 1);
    }

    #[tokio::test]
    async fn a_lost_worker_fails_its_job_naming_it() {
        let (core, id, _streams, _dir) = running_job().await;
        core.detach(&WorkerId("w-2".into()));
        let s = core.get(&id).unwrap();
        assert_eq!(s.state, "failed");
        assert!(
            s.error.contains("worker w-2 (rank 1") && s.error.contains("generation 1"),
            "{}",
            s.error
        );
    }
}
