//! The durable side of the coordinator: what it writes to its [`Store`] as jobs change,
//! and what a coordinator loads once it wins the leader lease, before its
//! [`crate::server::Gate`] opens and it serves its first call.
//!
//! Writes go through one writer task in order (a job's newer record never loses to an
//! older one), so the state machine's lock is never held across a store round trip. A
//! job record is written when the job's machine changes (a new generation, a state, a
//! checkpoint, a loss), not on every verified step: a restarted coordinator continues
//! from the newest state its workers hold anyway, and the verified count is a high-water
//! mark that the new generation's reports raise again.

use std::sync::Arc;

use prost::Message;
use ringtrain_core::data_path::DataBinding;
use ringtrain_core::JobId;
use ringtrain_proto::v1::{JobStatus, SubmitRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{parse_num, Coordinator, JobEntry, Prepared, State};
use crate::checkpoint::CheckpointStore;
use crate::error::CoordinatorError;
use crate::job_machine::{Event, JobMachine, JobState, MachineConfig, MachineSnapshot};
use crate::store::Store;

/// Store writes queued before the writer task catches up; a full queue means the store
/// is stuck, and the write is dropped with an error in the log (the leader lease, which
/// the same store keeps alive, is then about to be lost too).
pub(super) const STORE_QUEUE: usize = 4096;

/// One write to the store.
#[derive(Debug)]
pub(super) enum StoreOp {
    Job { id: String, json: String },
    Checkpoint { id: String, step: u64, json: String },
    PutWorker { id: String, json: String },
    DropWorker { id: String },
}

/// A job as the store keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct JobRecord {
    number: u64,
    id: String,
    spec_toml: String,
    source: String,
    base_dir: String,
    out_dir: String,
    workers: u32,
    max_steps: u64,
    /// Dataset fields bound to uploaded files (absent in records from before uploads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    uploaded: Vec<DataBinding>,
    machine: MachineSnapshot,
    /// The status as the API shows it (protobuf bytes, hex): history, metrics, steps.
    status: String,
}

/// An entry of a job's checkpoint index.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointEntry {
    path: String,
    step: u64,
    generation: u64,
    final_: bool,
}

/// Drains `rx` into `store`, in order, until every sender is gone.
pub(super) async fn write_loop(store: Arc<dyn Store>, mut rx: mpsc::Receiver<StoreOp>) {
    while let Some(op) = rx.recv().await {
        let r = match &op {
            StoreOp::Job { id, json } => store.put_job(id, json.clone()).await,
            StoreOp::Checkpoint { id, step, json } => {
                store.put_checkpoint(id, *step, json.clone()).await
            }
            StoreOp::PutWorker { id, json } => store.put_worker(id, json.clone()).await,
            StoreOp::DropWorker { id } => store.drop_worker(id).await,
        };
        if let Err(e) = r {
            // A fenced write means a newer leader exists: the store has already cancelled
            // this coordinator's leadership, and `server::run` stops serving.
            error!(error = %e, op = ?op_name(&op), "store write failed");
        }
    }
}

fn op_name(op: &StoreOp) -> &'static str {
    match op {
        StoreOp::Job { .. } => "job",
        StoreOp::Checkpoint { .. } => "checkpoint",
        StoreOp::PutWorker { .. } => "put worker",
        StoreOp::DropWorker { .. } => "drop worker",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Coordinator {
    /// Queues a store write (dropped, with an error logged, when the queue is full).
    pub(super) fn store_write(&self, op: StoreOp) {
        let tx = self.store_tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = tx.as_ref() {
            if let Err(e) = tx.try_send(op) {
                error!(error = %e, "the store's write queue is full; a write is lost");
            }
        }
    }

    /// Writes job `n`'s record when its machine changed since the last write.
    pub(super) fn persist_job(&self, st: &mut State, n: u64) {
        let Some(job) = st.jobs.get_mut(&n) else {
            return;
        };
        // Called after every event: the key is a few integers, the snapshot is built only
        // when something worth saving changed.
        let key = job.machine.snapshot_key();
        if job.persisted == Some(key) {
            return;
        }
        job.persisted = Some(key);
        let snap = job.machine.snapshot();
        let status = job.status.borrow().encode_to_vec();
        let r = &job.request;
        let record = JobRecord {
            number: n,
            id: job.id.0.clone(),
            spec_toml: r.spec_toml.clone(),
            source: r.source.clone(),
            base_dir: r.base_dir.clone(),
            out_dir: job.out_dir.display().to_string(),
            workers: r.workers,
            max_steps: r.max_steps,
            uploaded: super::uploads::bindings(&r.uploaded),
            machine: snap,
            status: hex(&status),
        };
        match serde_json::to_string(&record) {
            Ok(json) => self.store_write(StoreOp::Job {
                id: job.id.0.clone(),
                json,
            }),
            Err(e) => error!(job = %job.id, error = %e, "cannot encode the job record"),
        }
    }

    /// Records a stored checkpoint in the job's index.
    pub(super) fn persist_checkpoint(
        &self,
        job: &str,
        step: u64,
        generation: u64,
        final_: bool,
        path: &std::path::Path,
    ) {
        let entry = CheckpointEntry {
            path: path.display().to_string(),
            step,
            generation,
            final_,
        };
        if let Ok(json) = serde_json::to_string(&entry) {
            self.store_write(StoreOp::Checkpoint {
                id: job.to_string(),
                step,
                json,
            });
        }
    }

    /// Loads jobs from [`crate::config::ServerConfig::store`] into this coordinator.
    /// `server::run` calls it once, right after the campaign is won and before the gate
    /// opens, so nothing is served from a half-loaded state. A running or waiting job
    /// comes back waiting: its workers reattach, and it continues in a new generation
    /// ("restarted") from the newest state they hold, or its newest checkpoint.
    pub async fn restore_from_store(&self) -> Result<(), CoordinatorError> {
        let records = self.store.jobs().await?;
        let workers = self.store.workers().await?;
        let mut max_worker = workers
            .iter()
            .filter_map(|(id, _)| parse_num(id, "w-"))
            .max()
            .unwrap_or(0);
        let mut restored = 0usize;
        for (key, json) in records {
            let record: JobRecord = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    warn!(key, error = %e, "skipping a job record that does not parse");
                    continue;
                }
            };
            for w in &record.machine.members {
                if let Some(n) = parse_num(&w.0, "w-") {
                    max_worker = max_worker.max(n);
                }
            }
            let id = record.id.clone();
            match self.restore_job(record).await {
                Ok(()) => restored += 1,
                Err(e) => error!(job = %id, error = %e, "cannot restore a job from the store"),
            }
        }
        let mut st = self.lock();
        st.next_worker = st.next_worker.max(max_worker);
        info!(jobs = restored, store = %self.store.describe(), "restored from the store");
        Ok(())
    }

    async fn restore_job(&self, record: JobRecord) -> Result<(), CoordinatorError> {
        let req = SubmitRequest {
            spec_toml: record.spec_toml.clone(),
            source: record.source.clone(),
            base_dir: record.base_dir.clone(),
            out_dir: record.out_dir.clone(),
            workers: record.workers,
            max_steps: record.max_steps,
            resume_dir: String::new(),
            uploaded: super::uploads::to_proto(&record.uploaded),
        };
        let live = !record.machine.state.is_terminal();
        // A DP job continues its ledger from its newest stored checkpoint: σ is planned
        // for the steps that remain, as on a resume.
        let spent = if live {
            let dir = std::path::PathBuf::from(&record.out_dir).join("checkpoints");
            tokio::task::spawn_blocking(move || {
                let (found, _) = CheckpointStore::new(dir, usize::MAX).latest_verified()?;
                Ok::<_, CoordinatorError>(found.and_then(|c| {
                    Some(ringtrain_core::privacy::Spent {
                        ledger: c.meta.resume.privacy_ledger?,
                        step: c.meta.step,
                    })
                }))
            })
            .await
            .map_err(|e| CoordinatorError::Transport(e.to_string()))??
            .unwrap_or_default()
        } else {
            Default::default()
        };
        let Prepared {
            file,
            data,
            spec_hash,
            plan,
            plan_json,
            privacy,
            ..
        } = self.prepare(&req, live, spent).await?;
        let status = unhex(&record.status)
            .and_then(|b| JobStatus::decode(b.as_slice()).ok())
            .ok_or_else(|| {
                CoordinatorError::Serialize(format!(
                    "job {}: its stored status does not decode",
                    record.id
                ))
            })?;
        let machine = JobMachine::restore(
            MachineConfig {
                min: file.workers.min() as usize,
                max: file.workers.max() as usize,
                max_restarts: file.fault.max_restarts,
                ..MachineConfig::fixed(file.workers.max() as usize)
            },
            record.machine,
        );
        let out_dir = std::path::PathBuf::from(&record.out_dir);
        let store = CheckpointStore::new(out_dir.join("checkpoints"), file.checkpoint.keep);
        let id = JobId(record.id.clone());
        let waiting = machine.state() == JobState::Waiting;
        let wait = std::time::Duration::from_secs(file.fault.max_wait_secs);
        let token = machine.wait_token();
        let trace = if live {
            // A job that was live continues here in a new trace: its old `job` span
            // ended with the coordinator that held it.
            super::trace::JobTrace::start(&id, &file.name)
        } else {
            super::trace::JobTrace::none()
        };
        let entry = JobEntry {
            id: id.clone(),
            request: req,
            persisted: None,
            waiting: Default::default(),
            machine,
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
        let n = record.number;
        let mut st = self.lock();
        st.next_job = st.next_job.max(n);
        st.job_index.insert(id.clone(), n);
        st.jobs.insert(n, entry);
        if let Some(job) = st.jobs.get(&n) {
            super::publish(job);
        }
        self.persist_job(&mut st, n);
        drop(st);
        if waiting {
            info!(job = %id, "restored a running job; it continues when its workers reattach");
            self.later(n, wait, Event::WaitExpired { token });
        }
        Ok(())
    }
}
