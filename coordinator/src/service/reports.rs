//! What workers send back: step and epoch reports, checkpoint uploads, shard requests.

use std::path::PathBuf;

use ringtrain_core::sharding;
use ringtrain_proto::v1::{
    worker_report, CheckpointUpload, Metrics, ShardChunk, ShardRequest, Split, WorkerReport,
};
use tracing::{info, info_span};

use super::outputs::{append_metrics, write_model, ModelInfo};
use super::Coordinator;
use crate::checkpoint::{CheckpointMeta, TrainingState};
use crate::error::CoordinatorError;
use crate::jobs::JobState;

/// Rows per shard message.
const SHARD_ROWS: usize = 2048;

impl Coordinator {
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
            Ok(ringtrain_core::wire::f32s_le(b).collect())
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
