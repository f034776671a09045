//! The coordinator's core: jobs, workers, scheduling, reports, checkpoints.
//!
//! State lives behind one `std::sync::Mutex`: every section is short bookkeeping and none
//! is held across an `.await` (file writes and data loading run on blocking threads,
//! outside the lock). Workers are reached through their attach streams.
//!
//! # Layout
//! - this file: the state, jobs (submit, cancel, the scheduler) and workers (attach,
//!   detach);
//! - [`reports`]: what workers send back: step/epoch reports, checkpoints, shard requests;
//! - [`job_data`]: loading and normalizing a job's datasets;
//! - [`outputs`]: the files a run leaves (metrics.jsonl, model.json, model.safetensors).

mod job_data;
mod outputs;
mod reports;

use job_data::load_data;
pub use job_data::JobData;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ringtrain_core::plan::TrainingPlan;
use ringtrain_proto::v1::{
    control_message, Assignment, CancelJob, ControlMessage, JobStatus, Metrics, Registered,
    Shutdown, SubmitRequest,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tonic::Status;
use tracing::{info, warn};

use crate::checkpoint::CheckpointStore;
use crate::config::ServerConfig;
use crate::error::CoordinatorError;
use crate::job_file::JobFile;
use crate::jobs::{JobId, JobState, ReplicaCheck, WorkerId};

/// Control messages buffered per worker.
const CONTROL_CAPACITY: usize = 16;

/// What the attach stream carries.
pub type ControlStream = mpsc::Receiver<Result<ControlMessage, Status>>;

#[derive(Debug)]
struct WorkerEntry {
    addr: String,
    data_addr: String,
    data_local: String,
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
            let mut data_locals = Vec::new();
            for k in chosen {
                if let Some((wid, w)) = st.workers.get(k) {
                    members.push(wid.clone());
                    peers.push(w.addr.clone());
                    data_peers.push(w.data_addr.clone());
                    data_locals.push(w.data_local.clone());
                }
            }
            // TCP data plane only when configured and every member offers one; the token
            // is fresh per generation, so a stale or foreign connection is refused.
            let use_tcp = self.config.data_plane == crate::config::DataPlane::Tcp
                && data_peers.iter().all(|d| !d.is_empty());
            let (data_peers, data_locals, ring_token) = if use_tcp {
                (data_peers, data_locals, random_token().to_vec())
            } else {
                (Vec::new(), Vec::new(), Vec::new())
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
                        data_locals: data_locals.clone(),
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
        data_local: String,
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
                    data_local,
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

#[cfg(test)]
mod tests {
    use super::*;
    use ringtrain_proto::v1::{worker_report, StepReport, WorkerReport};

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
            core.attach("a:1".into(), "a".into(), String::new(), String::new()),
            core.attach("b:1".into(), "b".into(), String::new(), String::new()),
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
