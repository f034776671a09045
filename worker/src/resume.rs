//! The training state a worker carries from one generation to the next, and how the
//! ranks of a new generation agree on where to start.
//!
//! When a generation ends, every survivor keeps its [`HeldState`] in memory. The next
//! generation's ranks first exchange a summary of what they hold (one small exact
//! all-reduce), then all pick the same start deterministically:
//! - the furthest state any eligible member holds (survivors of a loss are at most one
//!   step apart: a rank finishes step s+1 only when every rank contributed to it, so the
//!   furthest state is a complete, deterministic result); its lowest holder is the
//!   source, and members without that exact state receive it from the source over the
//!   ring (a wrapping u32 sum where every other rank adds zeros: a bit-exact broadcast).
//!   Joiners get parameters and optimizer state this way, from a peer, not from disk;
//! - when nobody holds state, the newest checkpoint (rank 0 fetches it from the
//!   coordinator and broadcasts it), or the initial parameters when there is none.
//!
//! State is eligible when it belongs to the job and was last advanced in a generation at
//! or after the assignment's `state_floor` (the coordinator raises the floor whenever a
//! generation starts from a checkpoint or from scratch, so an older line of state never
//! comes back).

use ringtrain_core::checkpoint::{EarlyStoppingState, ResumeState};
use ringtrain_proto::v1::{checkpoint_part, Assignment, CheckpointRequest};

use crate::error::WorkerError;
use crate::loss::MetricSums;
use crate::optimizer::Optimizer;
use crate::plan::TrainingPlan;

/// Everything a rank needs to continue training exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldState {
    /// The job.
    pub job_id: String,
    /// The last generation that advanced or agreed on this state.
    pub generation: u64,
    /// Optimizer steps completed.
    pub step: u64,
    /// Epochs whose end (validation, early stopping, summary) has been processed.
    pub epochs_done: u32,
    /// Training steps are over (early stopping, the last epoch, or the step limit);
    /// what remains is the test evaluation and the final checkpoint.
    pub done: bool,
    /// Parameters.
    pub params: Vec<f32>,
    /// Optimizer state.
    pub opt: Optimizer,
    /// Early stopping's best value and (with `restore_best`) its parameters.
    pub best: Option<(f64, Vec<f32>)>,
    /// Epochs in a row without improvement.
    pub since_best: u32,
    /// The epoch in progress: its global metric sums so far.
    pub epoch_sums: MetricSums,
    /// The epoch in progress: its L2 penalty so far (summed per example).
    pub penalty_sum: f64,
}

/// Where a generation's state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Kept in memory by a member (possibly sent by a peer).
    Peer,
    /// The job's newest checkpoint.
    Checkpoint,
    /// The initial parameters.
    Init,
}

impl Source {
    /// The name in the `Resumed` report.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Peer => "peer",
            Source::Checkpoint => "checkpoint",
            Source::Init => "init",
        }
    }
}

/// Words per rank in the summary exchange.
const SUMMARY: usize = 5;
/// Fixed header words of the broadcast encoding.
const HEADER: usize = 12;

impl HeldState {
    /// The state before the first step.
    pub fn fresh(plan: &TrainingPlan, job_id: &str, classes: usize) -> Self {
        let params = plan.model.init_params(plan.seed);
        let n = params.len();
        HeldState {
            job_id: job_id.to_string(),
            generation: 0,
            step: 0,
            epochs_done: 0,
            done: false,
            opt: Optimizer::new(plan.optimizer, n),
            params,
            best: None,
            since_best: 0,
            epoch_sums: MetricSums::new(classes),
            penalty_sum: 0.0,
        }
    }

    /// The replica fingerprint of the parameters.
    pub fn hash(&self) -> u64 {
        crate::param_hash(&self.params)
    }

    /// How far it got: later states compare greater.
    fn position(&self) -> (u64, u32, bool) {
        (self.step, self.epochs_done, self.done)
    }

    /// The resume part of a checkpoint of this state.
    pub fn resume_state(&self, plan: &TrainingPlan) -> ResumeState {
        let spe = plan.steps_per_epoch().max(1) as u64;
        let into_epoch = self
            .step
            .saturating_sub(self.epochs_done as u64 * spe)
            .min(spe);
        ResumeState {
            epoch: self.epochs_done,
            epoch_cursor: (into_epoch as usize * plan.batch_size).min(plan.train_samples) as u64,
            rng_seed: plan.seed,
            schedule_step: self.step,
            early_stopping: self.early_state(plan),
            privacy_ledger: None,
            epoch_sums: Some(self.epoch_sums.to_f64s()),
            penalty_sum: self.penalty_sum,
        }
    }

    /// Early stopping's state for a checkpoint.
    pub fn early_state(&self, plan: &TrainingPlan) -> Option<EarlyStoppingState> {
        let es = plan.early_stopping.as_ref()?;
        Some(EarlyStoppingState {
            best: self.best.as_ref().map(|(v, _)| *v).unwrap_or(f64::NAN),
            since_best: self.since_best,
            has_best_params: es.restore_best
                && self.best.as_ref().is_some_and(|(_, p)| !p.is_empty()),
        })
    }

    /// The best epoch's parameters, when early stopping keeps them.
    pub fn best_params(&self, plan: &TrainingPlan) -> Option<&[f32]> {
        let keep = plan
            .early_stopping
            .as_ref()
            .is_some_and(|es| es.restore_best);
        self.best
            .as_ref()
            .filter(|(_, p)| keep && !p.is_empty())
            .map(|(_, p)| p.as_slice())
    }

    /// Words of the broadcast encoding for a model of `p` parameters.
    fn encoded_len(p: usize, slots: usize, classes: usize) -> usize {
        HEADER + 2 * MetricSums::flat_len(classes) + p * (2 + slots)
    }

    /// The state as u32 words (f32 and f64 bit patterns), in a layout every rank can
    /// size from the plan alone.
    fn encode(&self, out: &mut [u32]) {
        let (s0, s1) = lo_hi(self.step);
        let (t0, t1) = lo_hi(self.opt.t);
        let (b0, b1) = lo_hi(self.best.as_ref().map(|b| b.0).unwrap_or(0.0).to_bits());
        let (q0, q1) = lo_hi(self.penalty_sum.to_bits());
        let has_best = match &self.best {
            None => 0,
            Some((_, p)) if p.is_empty() => 1,
            Some(_) => 2,
        };
        let header = [
            s0,
            s1,
            self.epochs_done,
            self.done as u32,
            self.since_best,
            has_best,
            t0,
            t1,
            b0,
            b1,
            q0,
            q1,
        ];
        out[..HEADER].copy_from_slice(&header);
        let mut at = HEADER;
        for v in self.epoch_sums.to_f64s() {
            let (a, b) = lo_hi(v.to_bits());
            out[at] = a;
            out[at + 1] = b;
            at += 2;
        }
        let p = self.params.len();
        let mut put = |src: &[f32], at: &mut usize| {
            for (o, v) in out[*at..*at + p].iter_mut().zip(src) {
                *o = v.to_bits();
            }
            *at += p;
        };
        put(&self.params, &mut at);
        for slot in &self.opt.slots {
            put(slot, &mut at);
        }
        if let Some((_, bp)) = &self.best {
            if !bp.is_empty() {
                put(bp, &mut at);
            }
        }
    }

    /// Reads a state written by [`HeldState::encode`].
    fn decode(words: &[u32], plan: &TrainingPlan, job_id: &str, classes: usize) -> Self {
        let mut s = HeldState::fresh_shape(plan, job_id, classes);
        let p = s.params.len();
        let u64_at = |i: usize| words[i] as u64 | ((words[i + 1] as u64) << 32);
        s.step = u64_at(0);
        s.epochs_done = words[2];
        s.done = words[3] != 0;
        s.since_best = words[4];
        let has_best = words[5];
        s.opt.t = u64_at(6);
        let best_value = f64::from_bits(u64_at(8));
        s.penalty_sum = f64::from_bits(u64_at(10));
        let mut at = HEADER;
        let sums: Vec<f64> = (0..MetricSums::flat_len(classes))
            .map(|i| f64::from_bits(u64_at(at + 2 * i)))
            .collect();
        at += 2 * sums.len();
        s.epoch_sums = MetricSums::from_f64s(classes, &sums);
        let take = |at: &mut usize| -> Vec<f32> {
            let v = words[*at..*at + p]
                .iter()
                .map(|w| f32::from_bits(*w))
                .collect();
            *at += p;
            v
        };
        s.params = take(&mut at);
        for slot in s.opt.slots.iter_mut() {
            *slot = take(&mut at);
        }
        s.best = match has_best {
            0 => None,
            1 => Some((best_value, Vec::new())),
            _ => Some((best_value, take(&mut at))),
        };
        s
    }

    /// Zeroed buffers of the right shapes (no initialization drawn).
    fn fresh_shape(plan: &TrainingPlan, job_id: &str, classes: usize) -> Self {
        let n = plan.model.num_params();
        HeldState {
            job_id: job_id.to_string(),
            generation: 0,
            step: 0,
            epochs_done: 0,
            done: false,
            params: vec![0.0; n],
            opt: Optimizer::new(plan.optimizer, n),
            best: None,
            since_best: 0,
            epoch_sums: MetricSums::new(classes),
            penalty_sum: 0.0,
        }
    }
}

fn lo_hi(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

/// The collectives the agreement needs, entered from the step thread.
pub trait Exchange {
    /// Wrapping u64 sum across all ranks, in place.
    fn sum_u64(&mut self, buf: &mut [u64]) -> Result<(), WorkerError>;
    /// Wrapping u32 sum across all ranks, in place.
    fn sum_u32(&mut self, buf: &mut [u32]) -> Result<(), WorkerError>;
    /// The job's newest checkpoint from the coordinator.
    fn fetch_checkpoint(&mut self) -> Result<HeldState, WorkerError>;
}

/// What the ranks hold, as the summary exchange sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holding {
    position: (u64, u32, bool),
    hash: u64,
}

/// Agrees with the other ranks of the generation on the state to start from and leaves
/// it in `slot`. On an error `slot` holds a state this rank may still offer next time
/// (its own, or one it fully received).
pub fn agree(
    a: &Assignment,
    plan: &TrainingPlan,
    classes: usize,
    slot: &mut Option<HeldState>,
    ex: &mut dyn Exchange,
) -> Result<Source, WorkerError> {
    let (rank, world) = (a.rank as usize, a.world as usize);
    let mine = slot
        .as_ref()
        .filter(|h| h.job_id == a.job_id && h.generation >= a.state_floor && h.generation > 0);
    let mut summary = vec![0u64; SUMMARY * world];
    if let Some(h) = mine {
        let (step, epochs, done) = h.position();
        summary[rank * SUMMARY..(rank + 1) * SUMMARY].copy_from_slice(&[
            1,
            step,
            epochs as u64,
            done as u64,
            h.hash(),
        ]);
    }
    if world > 1 {
        ex.sum_u64(&mut summary)?;
    }
    let holdings: Vec<Option<Holding>> = summary
        .chunks(SUMMARY)
        .map(|c| {
            (c[0] == 1).then_some(Holding {
                position: (c[1], c[2] as u32, c[3] != 0),
                hash: c[4],
            })
        })
        .collect();
    let p = plan.model.num_params();
    let len = HeldState::encoded_len(p, plan.optimizer.slot_names().len(), classes);
    let furthest = holdings
        .iter()
        .enumerate()
        .filter_map(|(r, h)| h.map(|h| (r, h)))
        .max_by(|(ra, a), (rb, b)| a.position.cmp(&b.position).then(rb.cmp(ra)));
    let source = match furthest {
        Some((src, want)) => {
            let has = |h: &Option<Holding>| *h == Some(want);
            if holdings.iter().all(has) {
                // Everyone already holds the very same state.
            } else {
                let mut words = vec![0u32; len];
                if rank == src {
                    if let Some(h) = slot.as_ref() {
                        h.encode(&mut words);
                    }
                }
                ex.sum_u32(&mut words)?;
                if !has(&holdings[rank]) {
                    let got = HeldState::decode(&words, plan, &a.job_id, classes);
                    if got.hash() != want.hash {
                        return Err(WorkerError::Plan(format!(
                            "the state received from rank {src} hashes to {:016x}, it announced {:016x}",
                            got.hash(),
                            want.hash
                        )));
                    }
                    *slot = Some(got);
                }
            }
            Source::Peer
        }
        None if a.checkpoint_step > 0 => {
            // Rank 0 fetches and broadcasts, so every rank has the very same checkpoint
            // even if a newer one lands meanwhile.
            let mut words = vec![0u32; len];
            if rank == 0 {
                let c = ex.fetch_checkpoint()?;
                c.encode(&mut words);
            }
            if world > 1 {
                ex.sum_u32(&mut words)?;
            }
            *slot = Some(HeldState::decode(&words, plan, &a.job_id, classes));
            Source::Checkpoint
        }
        None => {
            *slot = Some(HeldState::fresh(plan, &a.job_id, classes));
            Source::Init
        }
    };
    if let Some(h) = slot.as_mut() {
        h.generation = a.generation;
    }
    Ok(source)
}

/// Reads the checkpoint parts the coordinator streams into a state.
pub fn state_from_checkpoint(
    parts: Vec<ringtrain_proto::v1::CheckpointPart>,
    plan: &TrainingPlan,
    job_id: &str,
    classes: usize,
) -> Result<HeldState, WorkerError> {
    let bad = |m: String| WorkerError::Shard(format!("checkpoint from the coordinator: {m}"));
    let mut it = parts.into_iter();
    let header = match it.next().and_then(|p| p.kind) {
        Some(checkpoint_part::Kind::Header(h)) => h,
        _ => return Err(bad("it does not start with a header".into())),
    };
    let p = plan.model.num_params();
    let mut bufs: Vec<Vec<u8>> = vec![Vec::with_capacity(p * 4); header.buffers.len()];
    for part in it {
        if let Some(checkpoint_part::Kind::Data(d)) = part.kind {
            let b = bufs
                .get_mut(d.buffer as usize)
                .ok_or_else(|| bad(format!("data for buffer {} it did not announce", d.buffer)))?;
            b.extend_from_slice(&d.data);
        }
    }
    if bufs.iter().any(|b| b.len() != p * 4) {
        return Err(bad(format!(
            "buffers of {:?} bytes, the model needs {} each",
            bufs.iter().map(|b| b.len()).collect::<Vec<_>>(),
            p * 4
        )));
    }
    let resume: ResumeState =
        serde_json::from_str(&header.resume_json).map_err(|e| bad(format!("resume state: {e}")))?;
    let f32s = |b: &[u8]| -> Vec<f32> { crate::wire::f32s_le(b).collect() };
    let mut s = HeldState::fresh_shape(plan, job_id, classes);
    let slot_names = plan.optimizer.slot_names();
    for (name, data) in header.buffers.iter().zip(&bufs) {
        if name == "params" {
            s.params = f32s(data);
        } else if name == "best" {
            s.best = Some((f64::NAN, f32s(data)));
        } else if let Some(slot) = name.strip_prefix("opt.") {
            let i = slot_names
                .iter()
                .position(|n| *n == slot)
                .ok_or_else(|| bad(format!("unknown optimizer buffer {name:?}")))?;
            s.opt.slots[i] = f32s(data);
        }
    }
    if crate::param_hash(&s.params) != header.param_hash {
        return Err(bad(format!(
            "its parameters hash to {:016x}, its header says {:016x}",
            crate::param_hash(&s.params),
            header.param_hash
        )));
    }
    s.step = header.step;
    s.opt.t = header.optimizer_t;
    s.epochs_done = resume.epoch;
    if let Some(es) = &resume.early_stopping {
        s.since_best = es.since_best;
        if !es.best.is_nan() {
            let params = s.best.take().map(|(_, p)| p).unwrap_or_default();
            s.best = Some((es.best, params));
        }
    }
    if let Some(sums) = &resume.epoch_sums {
        s.epoch_sums = MetricSums::from_f64s(classes, sums);
    }
    s.penalty_sum = resume.penalty_sum;
    let early_stopped = match (&plan.early_stopping, &resume.early_stopping) {
        (Some(cfg), Some(es)) => es.since_best >= cfg.patience,
        _ => false,
    };
    s.done = header.r#final
        && (s.epochs_done >= plan.epochs || early_stopped || s.step >= plan.step_limit());
    Ok(s)
}

/// The request for the job's newest checkpoint.
pub fn checkpoint_request(a: &Assignment, worker_id: &str) -> CheckpointRequest {
    CheckpointRequest {
        job_id: a.job_id.clone(),
        generation: a.generation,
        rank: a.rank,
        worker_id: worker_id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn plan() -> TrainingPlan {
        let toml = r#"
            name = "t"
            seed = 3
            epochs = 2
            batch_size = 8
            [data]
            train = { format = "synthetic", samples = 64, features = 4, classes = 3 }
            [model]
            input = 4
            layers = [{ dense = 5, activation = "relu" }, { dense = 3, activation = "softmax" }]
            [train]
            loss = "sparse_categorical_crossentropy"
            metrics = ["accuracy"]
        "#;
        let file = ringtrain_core::job_file::JobFile::parse(toml, "t.toml").unwrap();
        file.training_plan(ringtrain_core::job_file::PlanData {
            train_samples: 64,
            validation_samples: 0,
            test_samples: 0,
            features: 4,
            collective_timeout_ms: 1000,
            target_center: 0.0,
            max_steps: None,
        })
    }

    #[test]
    fn the_broadcast_encoding_round_trips_bit_for_bit() {
        let plan = plan();
        let mut s = HeldState::fresh(&plan, "j-1", 3);
        s.step = 7;
        s.epochs_done = 1;
        s.opt.t = 7;
        s.opt.slots[0][2] = -0.0;
        s.opt.slots[1][1] = 1.5e-9;
        s.params[0] = f32::from_bits(0x8000_0000);
        s.best = Some((0.25, s.params.clone()));
        s.since_best = 2;
        s.epoch_sums.loss_sum = 1.0 / 3.0;
        s.penalty_sum = 0.125;
        let mut words = vec![0u32; HeldState::encoded_len(s.params.len(), s.opt.slots.len(), 3)];
        s.encode(&mut words);
        let back = HeldState::decode(&words, &plan, "j-1", 3);
        assert_eq!(back, s);
        assert_eq!(back.params[0].to_bits(), 0x8000_0000);
    }

    /// Exact sums across rank threads: every rank adds its buffer into the shared
    /// accumulator of collective k, waits for the others, and reads the total.
    struct SimRank {
        shared: std::sync::Arc<(std::sync::Mutex<Vec<Vec<u64>>>, std::sync::Barrier)>,
        k: usize,
        checkpoint: Option<HeldState>,
    }

    impl SimRank {
        fn sum(&mut self, buf: &mut [u64]) {
            let (acc, barrier) = &*self.shared;
            {
                let mut acc = acc.lock().unwrap();
                if acc.len() <= self.k {
                    acc.resize(self.k + 1, Vec::new());
                }
                let a = &mut acc[self.k];
                if a.is_empty() {
                    a.resize(buf.len(), 0);
                }
                for (x, y) in a.iter_mut().zip(buf.iter()) {
                    *x = x.wrapping_add(*y);
                }
            }
            barrier.wait();
            buf.copy_from_slice(&acc.lock().unwrap()[self.k]);
            barrier.wait();
            self.k += 1;
        }
    }

    impl Exchange for SimRank {
        fn sum_u64(&mut self, buf: &mut [u64]) -> Result<(), WorkerError> {
            self.sum(buf);
            Ok(())
        }
        fn sum_u32(&mut self, buf: &mut [u32]) -> Result<(), WorkerError> {
            let mut wide: Vec<u64> = buf.iter().map(|&w| w as u64).collect();
            self.sum(&mut wide);
            for (o, w) in buf.iter_mut().zip(wide) {
                *o = w as u32;
            }
            Ok(())
        }
        fn fetch_checkpoint(&mut self) -> Result<HeldState, WorkerError> {
            self.checkpoint
                .clone()
                .ok_or_else(|| WorkerError::Plan("no checkpoint".into()))
        }
    }

    fn agree_all(
        slots: Vec<Option<HeldState>>,
        floor: u64,
        checkpoint: Option<HeldState>,
    ) -> Vec<(Source, HeldState)> {
        let world = slots.len();
        let shared = std::sync::Arc::new((
            std::sync::Mutex::new(Vec::new()),
            std::sync::Barrier::new(world),
        ));
        let handles: Vec<_> = slots
            .into_iter()
            .enumerate()
            .map(|(rank, mut slot)| {
                let mut ex = SimRank {
                    shared: shared.clone(),
                    k: 0,
                    checkpoint: checkpoint.clone(),
                };
                let checkpoint_step = checkpoint.as_ref().map(|c| c.step).unwrap_or(0);
                std::thread::spawn(move || {
                    let a = Assignment {
                        job_id: "j-1".into(),
                        generation: 5,
                        rank: rank as u32,
                        world: world as u32,
                        state_floor: floor,
                        checkpoint_step,
                        ..Assignment::default()
                    };
                    let src = agree(&a, &plan(), 3, &mut slot, &mut ex).unwrap();
                    (src, slot.unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn at_step(step: u64, generation: u64) -> HeldState {
        let mut s = HeldState::fresh(&plan(), "j-1", 3);
        s.generation = generation;
        s.step = step;
        s.opt.t = step;
        s.params[0] = step as f32;
        s.opt.slots[0][0] = step as f32 / 2.0;
        s
    }

    #[test]
    fn a_joiner_gets_the_survivors_state_from_a_peer() {
        let out = agree_all(
            vec![Some(at_step(9, 4)), Some(at_step(9, 4)), None],
            1,
            None,
        );
        for (src, s) in &out {
            assert_eq!(*src, Source::Peer);
            assert_eq!(s.step, 9);
            assert_eq!(s.params, out[0].1.params);
            assert_eq!(s.opt, out[0].1.opt);
            assert_eq!(s.generation, 5);
        }
    }

    #[test]
    fn survivors_one_step_apart_continue_from_the_furthest() {
        let out = agree_all(vec![Some(at_step(9, 4)), Some(at_step(10, 4))], 1, None);
        assert!(out
            .iter()
            .all(|(src, s)| *src == Source::Peer && s.step == 10));
        assert_eq!(out[0].1, out[1].1);
    }

    #[test]
    fn state_below_the_floor_or_of_another_job_does_not_count() {
        let mut other = at_step(50, 4);
        other.job_id = "j-2".into();
        let out = agree_all(vec![Some(at_step(30, 2)), Some(other)], 3, None);
        assert!(out
            .iter()
            .all(|(src, s)| *src == Source::Init && s.step == 0));
        let fresh = HeldState::fresh(&plan(), "j-1", 3);
        assert_eq!(out[0].1.params, fresh.params);
    }

    #[test]
    fn nobody_holding_state_loads_the_checkpoint_everywhere() {
        let ckpt = at_step(16, 0);
        let out = agree_all(vec![None, None, None], 1, Some(ckpt.clone()));
        for (src, s) in &out {
            assert_eq!(*src, Source::Checkpoint);
            assert_eq!(s.step, 16);
            assert_eq!(s.params, ckpt.params);
        }
    }
}
