//! What workers send back: step and epoch reports, checkpoint uploads, shard requests.

use std::path::PathBuf;

use ringtrain_core::sharding;
use ringtrain_core::{Rank, Step, WorkerId};
use ringtrain_proto::v1::{
    checkpoint_part, worker_report, CheckpointData, CheckpointHeader, CheckpointPart,
    CheckpointRequest, EpochSummary, Finished, Metrics, ShardChunk, ShardRequest, Split,
    StepReport, WorkerReport,
};
use tracing::{info, info_span, warn};

use super::outputs::{append_metrics, write_model, ModelInfo};
use super::{Coordinator, JobEntry};
use crate::checkpoint::{Checkpoint, CheckpointMeta, CheckpointStore, ResumeState, TrainingState};
use crate::error::CoordinatorError;
use crate::job_machine::{Effect, Event};

/// Rows per shard message.
const SHARD_ROWS: usize = 2048;

impl Coordinator {
    /// Handles one report from a worker. Reports from a stale generation, or from a
    /// worker that does not hold the rank it claims, are ignored.
    pub async fn report(&self, mut r: WorkerReport) {
        // ε at an epoch's end or at the finish, computed before the state is locked (the
        // accountant may take a while); the epoch's summary carries it as a metric.
        let privacy = self.privacy_for_report(&mut r).await;
        let epoch_line = {
            let mut st = self.lock();
            let n = match Self::member(&mut st, &r.job_id, r.generation, r.rank, &r.worker_id) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "ignoring stale report");
                    return;
                }
            };
            let rank = Rank(r.rank);
            let line = match r.kind {
                Some(worker_report::Kind::Step(s)) => {
                    if let Some(job) = st.jobs.get_mut(&n) {
                        if rank.0 == 0 && s.step > 0 {
                            show_step(job, &s);
                        }
                        if !job.waiting.is_empty() {
                            job.waiting.retain(|_, (w, _)| *w > s.step);
                            show_stall(job);
                        }
                    }
                    self.apply(
                        &mut st,
                        n,
                        Event::StepReported {
                            rank,
                            step: Step(s.step),
                            param_hash: s.param_hash,
                        },
                    );
                    None
                }
                Some(worker_report::Kind::Epoch(e)) => match (e.summary, st.jobs.get(&n)) {
                    (Some(summary), Some(job)) => {
                        if let Some(p) = privacy {
                            job.status.send_modify(|st| st.privacy = Some(p));
                        }
                        show_epoch(job, &summary);
                        Some((job.out_dir.clone(), summary))
                    }
                    _ => None,
                },
                Some(worker_report::Kind::Failure(f)) => {
                    let mut lost_rank = f.lost_rank.map(Rank);
                    // A rank that was itself waiting in the stalled all-reduce was there,
                    // alive: when exactly one rank never joined it, that one is to blame.
                    if let (Some(lr), Some(job)) = (lost_rank, st.jobs.get(&n)) {
                        let g = job.machine.generation().0;
                        if job.waiting.contains_key(&(g, lr.0)) {
                            let late: Vec<u32> = (0..job.machine.members().len() as u32)
                                .filter(|r| !job.waiting.contains_key(&(g, *r)))
                                .collect();
                            if let [only] = late[..] {
                                lost_rank = Some(Rank(only));
                            }
                        }
                    }
                    let lost_worker = lost_rank.and_then(|lr| {
                        let job = st.jobs.get(&n)?;
                        let w = job.machine.members().get(lr.index())?.clone();
                        st.worker(&w).map(|e| e.addr.clone())
                    });
                    let event = Event::Failure {
                        rank,
                        worker: WorkerId(r.worker_id.clone()),
                        message: f.message,
                        lost_rank,
                        // A peer that is gone from here too is certainly lost.
                        confirmed: lost_worker.is_none(),
                        lost_detail: lost_worker.unwrap_or_else(|| "gone".to_string()),
                    };
                    self.apply(&mut st, n, event);
                    None
                }
                Some(worker_report::Kind::Finished(f)) => {
                    if let Some(job) = st.jobs.get(&n) {
                        if rank.0 == 0 {
                            if let Some(p) = privacy {
                                if p.stopped_at_max_epsilon {
                                    info!(job = %job.id, step = f.steps, epsilon = p.epsilon, max_epsilon = p.max_epsilon, "training stopped: one more step would pass max_epsilon");
                                }
                                job.status.send_modify(|st| st.privacy = Some(p));
                            }
                            show_finished(job, &f);
                        }
                    }
                    let event = Event::RankFinished {
                        rank,
                        steps: Step(f.steps),
                    };
                    self.apply(&mut st, n, event);
                    None
                }
                Some(worker_report::Kind::Resumed(r)) => {
                    if let Some(job) = st.jobs.get(&n) {
                        if rank.0 == 0 {
                            show_resumed(job, r.step);
                        }
                        info!(job = %job.id, generation = job.machine.generation().0, rank = rank.0, step = r.step, source = %r.source, "rank resumed");
                    }
                    let event = Event::Resumed {
                        rank,
                        step: Step(r.step),
                        param_hash: r.param_hash,
                        fresh: r.source != "peer",
                    };
                    self.apply(&mut st, n, event);
                    None
                }
                Some(worker_report::Kind::Waiting(w)) => {
                    if let Some(job) = st.jobs.get_mut(&n) {
                        let g = job.machine.generation().0;
                        job.waiting.retain(|(jg, _), _| *jg == g);
                        job.waiting.insert((g, rank.0), (w.step, w.seconds));
                        show_stall(job);
                    }
                    None
                }
                Some(worker_report::Kind::Stopped(s)) => {
                    if let Some(job) = st.jobs.get(&n) {
                        info!(job = %job.id, generation = job.machine.generation().0, rank = rank.0, step = s.step, leaving = s.leaving, "rank stopped at the drain");
                    }
                    let event = Event::Stopped {
                        rank,
                        step: Step(s.step),
                        param_hash: s.param_hash,
                        leaving: s.leaving,
                    };
                    self.apply(&mut st, n, event);
                    None
                }
                None => None,
            };
            self.settle(&mut st);
            line
        };
        // The file append runs on a blocking thread, outside the lock; the report stream
        // is handled in order, so epochs land in order.
        if let Some((out_dir, summary)) = epoch_line {
            let _ = tokio::task::spawn_blocking(move || append_metrics(&out_dir, &summary)).await;
        }
    }

    /// Receives a checkpoint from rank 0 (a header, then its buffers in chunks), stores
    /// it, and for the final one also writes the run's model files.
    pub async fn upload_checkpoint<S>(&self, mut parts: S) -> Result<PathBuf, CoordinatorError>
    where
        S: futures::Stream<Item = Result<CheckpointPart, tonic::Status>> + Unpin,
    {
        use futures::StreamExt;
        let transport = |s: tonic::Status| CoordinatorError::Transport(s.to_string());
        let header = match parts.next().await.transpose().map_err(transport)? {
            Some(CheckpointPart {
                kind: Some(checkpoint_part::Kind::Header(h)),
            }) => h,
            _ => {
                return Err(CoordinatorError::Precondition(
                    "a checkpoint upload must start with its header".into(),
                ))
            }
        };
        let (store, meta, out_dir, info, n) = self.accept_checkpoint(&header)?;
        // The buffers, as raw bytes: each must be exactly the model's parameter count of
        // f32s, so a sender cannot make the coordinator hold more than one model's worth.
        let want = meta.model.num_params() * 4;
        let mut raw: Vec<Vec<u8>> = Vec::with_capacity(header.buffers.len());
        while let Some(part) = parts.next().await.transpose().map_err(transport)? {
            let Some(checkpoint_part::Kind::Data(d)) = part.kind else {
                return Err(CoordinatorError::Precondition(
                    "a checkpoint upload has one header, at its start".into(),
                ));
            };
            let i = d.buffer as usize;
            if i + 1 == raw.len() + 1 && i < header.buffers.len() {
                raw.push(Vec::with_capacity(want));
            }
            if i + 1 != raw.len() {
                return Err(CoordinatorError::Precondition(format!(
                    "checkpoint buffer {i} arrived out of order (expected {} of {:?})",
                    raw.len().saturating_sub(1),
                    header.buffers
                )));
            }
            let buf = &mut raw[i];
            if buf.len() + d.data.len() > want {
                return Err(CoordinatorError::Precondition(format!(
                    "checkpoint buffer {:?} is longer than the model's {} parameters",
                    header.buffers[i],
                    want / 4
                )));
            }
            buf.extend_from_slice(&d.data);
        }
        if raw.len() != header.buffers.len() || raw.iter().any(|b| b.len() != want) {
            return Err(CoordinatorError::Precondition(format!(
                "checkpoint upload ended early: got {} of {} buffers of {want} bytes each",
                raw.iter().filter(|b| b.len() == want).count(),
                header.buffers.len()
            )));
        }
        let (final_, step) = (meta.final_, meta.step);
        let (job_id, generation) = (meta.job_id.clone(), meta.generation);
        let span = info_span!("checkpoint", job = %meta.job_id, step, final_);
        // Decoding, hashing and fsyncs all run on a blocking thread, never the runtime's.
        let written = tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            let mut buffers = raw
                .iter()
                .map(|b| ringtrain_core::wire::f32s_le(b).collect());
            let params: Vec<f32> = buffers.next().unwrap_or_default();
            let mut rest: Vec<Vec<f32>> = buffers.collect();
            let best = meta
                .resume
                .early_stopping
                .as_ref()
                .is_some_and(|e| e.has_best_params)
                .then(|| rest.pop())
                .flatten();
            let state = TrainingState {
                params,
                slots: rest,
                best,
            };
            let path = store.write(&meta, &state)?;
            if final_ {
                write_model(&out_dir, &info, &meta, &state.params)?;
            }
            info!(path = %path.display(), "checkpoint written");
            Ok::<_, CoordinatorError>(path)
        })
        .await
        .map_err(|e| CoordinatorError::Transport(e.to_string()))
        .and_then(|r| r);
        let mut st = self.lock();
        match &written {
            Ok(path) => {
                self.persist_checkpoint(&job_id, step, generation, final_, path);
                self.apply(
                    &mut st,
                    n,
                    Event::CheckpointStored {
                        step: Step(step),
                        final_,
                    },
                );
            }
            Err(e) if final_ => {
                let message = format!("cannot store the final checkpoint: {e}");
                self.apply(&mut st, n, Event::Fault { message });
            }
            Err(_) => {}
        }
        self.settle(&mut st);
        written
    }

    /// Checks a checkpoint header against the job (rank 0 of the running generation, the
    /// buffers the optimizer has) and builds the metadata to store.
    #[allow(clippy::type_complexity)]
    fn accept_checkpoint(
        &self,
        h: &CheckpointHeader,
    ) -> Result<(CheckpointStore, CheckpointMeta, PathBuf, ModelInfo, u64), CoordinatorError> {
        let mut st = self.lock();
        let n = Self::member(&mut st, &h.job_id, h.generation, 0, &h.worker_id)?;
        let resume: ResumeState = serde_json::from_str(&h.resume_json)
            .map_err(|e| CoordinatorError::Precondition(format!("checkpoint resume state: {e}")))?;
        let Some(job) = st.jobs.get(&n) else {
            return Err(CoordinatorError::UnknownJob(h.job_id.clone()));
        };
        let slots: Vec<String> = job
            .plan
            .optimizer
            .slot_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut expected: Vec<String> = vec!["params".into()];
        expected.extend(slots.iter().map(|s| format!("opt.{s}")));
        if resume
            .early_stopping
            .as_ref()
            .is_some_and(|e| e.has_best_params)
        {
            expected.push("best".into());
        }
        if h.buffers != expected {
            return Err(CoordinatorError::Precondition(format!(
                "checkpoint buffers {:?}, this job's are {expected:?}",
                h.buffers
            )));
        }
        let mut resume = resume;
        if let Some(run) = &job.privacy {
            resume.privacy_ledger = Some(run.ledger_at(h.step).map_err(|e| {
                CoordinatorError::Precondition(format!("privacy ledger at step {}: {e}", h.step))
            })?);
        }
        let meta = CheckpointMeta {
            format: ringtrain_core::checkpoint::FORMAT.into(),
            version: ringtrain_core::checkpoint::VERSION,
            job_id: h.job_id.clone(),
            generation: h.generation,
            step: h.step,
            epoch: h.epoch,
            optimizer_t: h.optimizer_t,
            optimizer_slots: slots,
            spec_hash: job.spec_hash.clone(),
            param_hash: h.param_hash,
            final_: h.r#final,
            model: job.file.model.clone(),
            resume,
        };
        let found = (
            job.store.clone(),
            meta,
            job.out_dir.clone(),
            ModelInfo {
                file: job.file.clone(),
                normalization: job.data.normalization.clone(),
                feature_names: job.data.train.feature_names.clone(),
                label_name: job.data.train.label_name.clone(),
                privacy: job.privacy.clone(),
            },
            n,
        );
        let effects = self.apply(
            &mut st,
            n,
            Event::CheckpointUploaded {
                step: Step(h.step),
                final_: h.r#final,
            },
        );
        if !effects
            .iter()
            .any(|e| matches!(e, Effect::WriteCheckpoint { .. }))
        {
            return Err(CoordinatorError::Precondition(format!(
                "job {} does not take checkpoints now",
                h.job_id
            )));
        }
        Ok(found)
    }

    /// The job's newest stored checkpoint that verifies, as upload-format parts (a header,
    /// then every buffer in chunks), for a member of its running generation. A
    /// checkpoint that fails its checksum is skipped with a warning.
    pub async fn checkpoint_parts(
        &self,
        req: CheckpointRequest,
    ) -> Result<Vec<CheckpointPart>, CoordinatorError> {
        let store = {
            let mut st = self.lock();
            let n = Self::member(
                &mut st,
                &req.job_id,
                req.generation,
                req.rank,
                &req.worker_id,
            )?;
            st.jobs
                .get(&n)
                .map(|j| j.store.clone())
                .ok_or_else(|| CoordinatorError::UnknownJob(req.job_id.clone()))?
        };
        let job_id = req.job_id.clone();
        tokio::task::spawn_blocking(move || {
            let (found, _skipped) = store.latest_verified()?;
            let Some(c) = found else {
                return Err(CoordinatorError::Precondition(format!(
                    "job {job_id} has no stored checkpoint that verifies"
                )));
            };
            Ok(checkpoint_to_parts(&c))
        })
        .await
        .map_err(|e| CoordinatorError::Transport(e.to_string()))?
    }

    /// The rows of one split a worker should hold, as messages.
    pub fn shard(&self, req: &ShardRequest) -> Result<Vec<ShardChunk>, CoordinatorError> {
        let (data, plan, world) = {
            let mut st = self.lock();
            let n = Self::member(
                &mut st,
                &req.job_id,
                req.generation,
                req.rank,
                &req.worker_id,
            )?;
            let job = st
                .jobs
                .get(&n)
                .ok_or_else(|| CoordinatorError::UnknownJob(req.job_id.clone()))?;
            (
                job.data.clone(),
                job.plan.clone(),
                job.machine.members().len(),
            )
        };
        let rank = req.rank as usize;
        let rows: Vec<u32>;
        let split = Split::try_from(req.split)
            .map_err(|_| CoordinatorError::Precondition(format!("unknown split {}", req.split)))?;
        let set = match split {
            Split::Train => {
                if data.train.rows() != plan.train_samples {
                    return Err(CoordinatorError::Precondition(format!(
                        "the plan has {} training rows, the loaded data {}",
                        plan.train_samples,
                        data.train.rows()
                    )));
                }
                rows = plan
                    .rank_epoch(req.epoch, rank, world, req.start_batch as usize)
                    .0;
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

/// Bytes per checkpoint chunk sent to a worker.
const CHECKPOINT_CHUNK_BYTES: usize = 4 << 20;

/// A stored checkpoint in the upload's wire format.
fn checkpoint_to_parts(c: &Checkpoint) -> Vec<CheckpointPart> {
    let m = &c.meta;
    let mut buffers: Vec<(String, &[f32])> = vec![("params".into(), &c.state.params)];
    for (name, data) in m.optimizer_slots.iter().zip(&c.state.slots) {
        buffers.push((format!("opt.{name}"), data));
    }
    if let Some(b) = &c.state.best {
        buffers.push(("best".into(), b));
    }
    let header = CheckpointHeader {
        job_id: m.job_id.clone(),
        generation: m.generation,
        step: m.step,
        epoch: m.epoch,
        r#final: m.final_,
        optimizer_t: m.optimizer_t,
        param_hash: m.param_hash,
        worker_id: String::new(),
        buffers: buffers.iter().map(|(n, _)| n.clone()).collect(),
        resume_json: serde_json::to_string(&m.resume).unwrap_or_default(),
    };
    let mut parts = vec![CheckpointPart {
        kind: Some(checkpoint_part::Kind::Header(header)),
    }];
    for (i, (_, data)) in buffers.iter().enumerate() {
        for chunk in bytemuck::cast_slice::<f32, u8>(data).chunks(CHECKPOINT_CHUNK_BYTES) {
            parts.push(CheckpointPart {
                kind: Some(checkpoint_part::Kind::Data(CheckpointData {
                    buffer: i as u32,
                    data: chunk.to_vec().into(),
                })),
            });
        }
    }
    parts
}

/// Names the late ranks while some ranks wait in a step's all-reduce: those of the
/// generation that have not reported waiting for that step have not joined it (stopped,
/// slow, or cut off). Shown in the status and logged, before the deadline fires.
fn show_stall(job: &JobEntry) {
    let g = job.machine.generation().0;
    let Some(step) = job
        .waiting
        .iter()
        .filter(|((jg, _), _)| *jg == g)
        .map(|(_, (s, _))| *s)
        .max()
    else {
        job.status.send_if_modified(|st| {
            let had = !st.stalled.is_empty();
            st.stalled.clear();
            had
        });
        return;
    };
    let members = job.machine.members();
    let waiting: Vec<u32> = job
        .waiting
        .iter()
        .filter(|((jg, _), (s, _))| *jg == g && *s == step)
        .map(|((_, r), _)| *r)
        .collect();
    let waited = job
        .waiting
        .values()
        .map(|(_, secs)| *secs)
        .fold(0.0, f64::max);
    let late: Vec<String> = members
        .iter()
        .enumerate()
        .filter(|(r, _)| !waiting.contains(&(*r as u32)))
        .map(|(r, w)| format!("rank {r} (worker {w})"))
        .collect();
    let text = if late.is_empty() {
        format!(
            "every rank has waited {waited:.1} s in the all-reduce of step {step}: a ring link is stalled"
        )
    } else {
        format!(
            "{} late at step {step}: {} of {} ranks have waited {waited:.1} s for it in the all-reduce",
            late.join(", "),
            waiting.len(),
            members.len()
        )
    };
    let changed = job.status.send_if_modified(|st| {
        if st.stalled == text {
            return false;
        }
        st.stalled = text.clone();
        true
    });
    if changed {
        warn!(job = %job.id, generation = g, step, late = ?late, "collective stalled: {text}");
    }
}

impl Coordinator {
    /// The privacy status a report brings (`None` for a job without DP-SGD, or a report
    /// that does not move it): at an epoch's end, the step rank 0 last reported, with
    /// `epsilon` added to the epoch's metrics; at rank 0's finish, its last step.
    async fn privacy_for_report(
        &self,
        r: &mut WorkerReport,
    ) -> Option<ringtrain_proto::v1::PrivacyStatus> {
        let finished_steps = match &r.kind {
            Some(worker_report::Kind::Epoch(_)) => None,
            Some(worker_report::Kind::Finished(f)) if r.rank == 0 => Some(f.steps),
            _ => return None,
        };
        let (run, step) = {
            let st = self.lock();
            let n = st
                .job_index
                .get(&ringtrain_core::JobId::from(r.job_id.as_str()))?;
            let job = st.jobs.get(n)?;
            let run = job.privacy.clone()?;
            let step = finished_steps.unwrap_or_else(|| job.status.borrow().step);
            (run, step)
        };
        let budget = run.plan.budget_steps;
        let stopped = finished_steps.is_some()
            && budget.is_some_and(|b| step >= b && b < run.shape.total_steps());
        let report = match super::privacy::report_at(run, step).await {
            Ok(rep) => rep,
            Err(e) => {
                warn!(job = %r.job_id, step, error = %e, "cannot account for the privacy spent");
                return None;
            }
        };
        if let Some(worker_report::Kind::Epoch(e)) = &mut r.kind {
            if let Some(summary) = e.summary.as_mut() {
                summary.metrics.insert("epsilon".into(), report.epsilon);
            }
        }
        Some(super::privacy::status(&report, budget, stopped))
    }
}

/// Where the generation starts, into the status (the step shown never runs ahead of
/// the state the job continues from).
fn show_resumed(job: &JobEntry, step: u64) {
    let spe = job.plan.steps_per_epoch().max(1) as u64;
    job.status.send_modify(|st| {
        st.step = step;
        st.epoch = (step / spe) as u32;
    });
}

/// Rank 0's step report, into the status (progress, latest loss and accuracy).
fn show_step(job: &JobEntry, s: &StepReport) {
    let spe = job.plan.steps_per_epoch().max(1) as u64;
    job.status.send_modify(|st| {
        st.step = s.step;
        st.epoch = ((s.step - 1) / spe) as u32;
        let m = st.metrics.get_or_insert_with(Metrics::default);
        m.loss = Some(s.loss);
        m.accuracy = Some(s.accuracy);
    });
}

/// An epoch's summary, into the status (metrics, history, mean samples/s).
fn show_epoch(job: &JobEntry, summary: &EpochSummary) {
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

/// Rank 0's end of training, into the status (steps, timing, test metrics, early stop).
fn show_finished(job: &JobEntry, f: &Finished) {
    // Fewer epochs than planned means early stopping, unless a step limit (benchmarks'
    // max_steps, a DP job's max_epsilon budget) cut the run short.
    let early = f.epochs < job.file.epochs && f.steps < job.plan.step_limit();
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
}
