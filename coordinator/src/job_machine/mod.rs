//! The job state machine: one job's lifecycle and its generations, pure (no I/O, no
//! clock, no channels).
//!
//! The service feeds it [`Event`]s (workers available, a worker lost or joined, a step
//! or a rank's end reported, a failure, a checkpoint stored, a user's cancel) and carries
//! out the [`Effect`]s it returns (send assignments, cancel a generation, write a
//! checkpoint, end the job). Everything that decides *whether* a job moves lives here;
//! how a message reaches a worker or a file reaches the disk lives in the service.
//!
//! ```text
//! Submitted ──fewer than min──▶ Waiting ──at least min──▶ Running(g) ──all ranks verified──▶ Completed
//!     │                           ▲   │                    │  │  │
//!     └──────at least min─────────┼───┼───────────────────▶│  │  ├─ idle worker, below max ─▶ drain ─▶ all Stopped ─┐
//!                                 │   │                    │  │  ├─ a member leaves (SIGTERM) ─▶ all Stopped ───────┤
//!                                 │   └─max_wait_secs─▶ Failed ├─ worker lost (policy NewGeneration) ───────────────┤
//!                                 └──────────────────────────────────────────────────────────────────────────────┘
//!                                                           │  └─ failure / divergence / max_restarts / lost (policy Fail) ─▶ Failed
//! any non-terminal state ──cancel──▶ Cancelled
//! ```
//!
//! A generation ends in one of two ways. A **drain** (an idle worker could join, or a
//! member leaves) stops every rank after the same step, agreed in-band, so the next
//! generation starts where this one stopped: no rollback. A **loss** (a worker's stream
//! breaks, or a rank reports its peer gone) cancels the survivors wherever they are; the
//! next generation's ranks agree among themselves on the newest state any of them holds
//! (survivors are bit-identical, so nothing is reloaded), and only when none holds any
//! state do they load the newest checkpoint. Each generation's ranks report where they
//! started ([`Event::Resumed`]); steps are counted once over the whole job, a redone step
//! included.
//!
//! A job is completed only when every rank of the generation has reported its end with
//! the same step count, every one of those steps was verified across all replicas, and
//! the final checkpoint for that step is stored: rank 0's end alone never completes it.

// The vocabulary (states, events, effects, snapshots) and the replica check live beside
// the machine; the tests replay every transition from a table.
mod events;
mod replica;

pub use events::{
    Effect, Event, GenerationEvent, JobState, LossPolicy, MachineConfig, MachineSnapshot,
    NotAMember, StartKind,
};
pub use replica::{Divergence, ReplicaCheck};

use ringtrain_core::{Generation, Rank, Step, WorkerId};

/// See [`JobMachine::snapshot_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotKey {
    state: JobState,
    generation: Generation,
    state_floor: Generation,
    restarts: u32,
    events: (usize, Option<Step>),
    lost: usize,
    checkpoint: Option<Step>,
    failed: bool,
}

/// A rank's report that it stopped at a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StopReport {
    step: Step,
    hash: u64,
    leaving: bool,
}

/// One job's lifecycle.
#[derive(Debug, Clone)]
pub struct JobMachine {
    state: JobState,
    config: MachineConfig,
    generation: Generation,
    members: Vec<WorkerId>,
    replica: ReplicaCheck,
    /// The step the running generation started from, once its ranks reported it.
    base: Option<(Step, u64)>,
    /// The step the next (or running) generation is expected to start from.
    expected: Step,
    /// Highest step count verified across replicas, over the whole job.
    verified_hw: u64,
    finished: Vec<Option<Step>>,
    final_stored: Option<Step>,
    error: Option<String>,
    /// A drain in progress: the ranks' stop reports so far.
    draining: Option<Vec<Option<StopReport>>>,
    /// Workers that left gracefully and must not be taken again.
    leaving: Vec<WorkerId>,
    /// The last generation's survivors, first in line (in rank order) for the next.
    preferred: Vec<WorkerId>,
    /// Why the next generation starts.
    next_kind: StartKind,
    next_reason: String,
    lost: Vec<String>,
    restarts: u32,
    events: Vec<GenerationEvent>,
    state_floor: Generation,
    checkpoint: Option<Step>,
    wait_token: u64,
}

impl JobMachine {
    /// A submitted job that needs exactly `world` workers per generation.
    pub fn new(world: usize, policy: LossPolicy) -> Self {
        JobMachine::with_config(MachineConfig {
            policy,
            ..MachineConfig::fixed(world)
        })
    }

    /// A submitted job.
    pub fn with_config(config: MachineConfig) -> Self {
        let min = config.min.max(1);
        let max = config.max.max(min);
        let config = MachineConfig { min, max, ..config };
        JobMachine {
            state: JobState::Submitted,
            generation: Generation(0),
            members: Vec::new(),
            replica: ReplicaCheck::new(min),
            base: None,
            expected: config.checkpoint.unwrap_or_default(),
            verified_hw: config.checkpoint.map(|s| s.0).unwrap_or(0),
            finished: Vec::new(),
            final_stored: None,
            error: None,
            draining: None,
            leaving: Vec::new(),
            preferred: Vec::new(),
            next_kind: config.first,
            next_reason: config.first_reason.clone(),
            lost: Vec::new(),
            restarts: 0,
            events: Vec::new(),
            state_floor: Generation(1),
            checkpoint: config.checkpoint,
            wait_token: 0,
            config,
        }
    }

    /// A job picked up again by a restarted coordinator: a running or waiting job waits
    /// for its workers to reattach, then continues in a new generation from the newest
    /// state they hold (or its newest checkpoint).
    pub fn restore(config: MachineConfig, snap: MachineSnapshot) -> Self {
        let mut m = JobMachine::with_config(config);
        m.generation = snap.generation;
        m.state_floor = snap.state_floor;
        m.verified_hw = snap.verified;
        m.expected = Step(snap.verified);
        m.restarts = snap.restarts;
        m.events = snap.events;
        m.lost = snap.lost;
        m.preferred = snap.members;
        m.checkpoint = snap.checkpoint;
        m.error = snap.error;
        m.state = match snap.state {
            s if s.is_terminal() => s,
            JobState::Submitted => JobState::Submitted,
            _ => JobState::Waiting,
        };
        if m.state == JobState::Waiting {
            m.wait_token = 1;
        }
        if m.generation.0 > 0 {
            m.next_kind = StartKind::Restarted;
            m.next_reason = "the coordinator restarted".into();
        }
        m
    }

    /// What a restarted coordinator needs to pick the job up again.
    pub fn snapshot(&self) -> MachineSnapshot {
        MachineSnapshot {
            state: self.state,
            generation: self.generation,
            state_floor: self.state_floor,
            verified: self.verified_steps(),
            restarts: self.restarts,
            events: self.events.clone(),
            lost: self.lost.clone(),
            members: if self.members.is_empty() {
                self.preferred.clone()
            } else {
                self.members.clone()
            },
            checkpoint: self.checkpoint,
            error: self.error.clone(),
        }
    }

    /// A cheap fingerprint of everything [`JobMachine::snapshot`] holds except the
    /// verified count (which moves every step): equal keys mean nothing worth saving
    /// changed.
    pub fn snapshot_key(&self) -> SnapshotKey {
        SnapshotKey {
            state: self.state,
            generation: self.generation,
            state_floor: self.state_floor,
            restarts: self.restarts,
            events: (self.events.len(), self.events.last().map(|e| e.step)),
            lost: self.lost.len(),
            checkpoint: self.checkpoint,
            failed: self.error.is_some(),
        }
    }

    /// The current state.
    pub fn state(&self) -> JobState {
        self.state
    }

    /// The current (or last) generation; 0 before the first.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Most workers per generation.
    pub fn world(&self) -> usize {
        self.config.max
    }

    /// The job's range of members per generation.
    pub fn range(&self) -> (usize, usize) {
        (self.config.min, self.config.max)
    }

    /// Members of the running generation in rank order (empty when not running).
    pub fn members(&self) -> &[WorkerId] {
        &self.members
    }

    /// Every generation's start, oldest first.
    pub fn events(&self) -> &[GenerationEvent] {
        &self.events
    }

    /// Steps verified across replicas, each counted once over the whole job (a step
    /// redone in a later generation included).
    pub fn verified_steps(&self) -> u64 {
        let current = self
            .base
            .map(|(b, _)| b.0 + self.replica.verified())
            .unwrap_or(0);
        self.verified_hw.max(current)
    }

    /// Why the job failed, once it has.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The token of the current wait (see [`Effect::WaitDeadline`]).
    pub fn wait_token(&self) -> u64 {
        self.wait_token
    }

    /// Whether a drain is in progress.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Checks that a message comes from `rank` of the running `generation`, sent by the
    /// worker that holds that rank.
    pub fn check_member(
        &self,
        generation: Generation,
        rank: Rank,
        worker: &WorkerId,
    ) -> Result<(), NotAMember> {
        if self.state != JobState::Running || self.generation != generation {
            return Err(NotAMember {
                message: format!(
                    "the job is {} in generation {}, not running generation {generation}",
                    self.state.as_str(),
                    self.generation
                ),
            });
        }
        match self.members.get(rank.index()) {
            Some(w) if w == worker => Ok(()),
            _ => Err(NotAMember {
                message: format!("worker {worker} is not rank {rank} of generation {generation}"),
            }),
        }
    }

    /// Applies one event; returns what the service must do, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Effect> {
        if self.state.is_terminal() {
            return Vec::new();
        }
        match event {
            Event::WorkersAvailable { idle } => self.on_available(idle),
            Event::WorkerLost { worker, detail } => self.on_lost(&worker, &detail),
            Event::WorkerJoined { .. } => Vec::new(),
            Event::StepReported {
                rank,
                step,
                param_hash,
            } => self.on_step(rank, step, param_hash),
            Event::Resumed {
                rank,
                step,
                param_hash,
                fresh,
            } => self.on_resumed(rank, step, param_hash, fresh),
            Event::Stopped {
                rank,
                step,
                param_hash,
                leaving,
            } => self.on_stopped(
                rank,
                StopReport {
                    step,
                    hash: param_hash,
                    leaving,
                },
            ),
            Event::RankFinished { rank, steps } => self.on_finished(rank, steps),
            Event::Failure {
                rank,
                worker,
                message,
                lost_rank,
                lost_detail,
                confirmed: false,
            } if lost_rank.is_some() && self.state == JobState::Running => {
                vec![Effect::ConfirmLater {
                    event: Box::new(Event::Failure {
                        rank,
                        worker,
                        message,
                        lost_rank,
                        lost_detail,
                        confirmed: true,
                    }),
                }]
            }
            Event::Failure {
                rank,
                worker,
                message,
                lost_rank,
                lost_detail,
                ..
            } => self.on_failure(rank, &worker, &message, lost_rank, &lost_detail),
            Event::CheckpointUploaded { step, final_ } if self.state == JobState::Running => {
                vec![Effect::WriteCheckpoint { step, final_ }]
            }
            Event::CheckpointUploaded { .. } => Vec::new(),
            Event::CheckpointStored { step, final_ } => {
                if self.checkpoint.is_none_or(|c| c <= step) {
                    self.checkpoint = Some(step);
                }
                if final_ && self.state == JobState::Running {
                    self.final_stored = Some(step);
                    self.try_complete()
                } else {
                    Vec::new()
                }
            }
            Event::WaitExpired { token } => self.on_wait_expired(token),
            Event::Fault { message } => self.fail(message),
            Event::Cancel => self.end(JobState::Cancelled, None, "cancelled"),
        }
    }

    fn on_available(&mut self, idle: Vec<WorkerId>) -> Vec<Effect> {
        let usable: Vec<WorkerId> = idle
            .into_iter()
            .filter(|w| !self.leaving.contains(w))
            .collect();
        match self.state {
            JobState::Submitted | JobState::Waiting => self.start_generation(usable),
            JobState::Running => self.maybe_grow(usable),
            _ => Vec::new(),
        }
    }

    /// Starts the next generation with the previous survivors (in their rank order)
    /// followed by other idle workers, up to the maximum; with fewer than the minimum
    /// the job waits.
    fn start_generation(&mut self, idle: Vec<WorkerId>) -> Vec<Effect> {
        let mut pick: Vec<WorkerId> = self
            .preferred
            .iter()
            .filter(|w| idle.contains(w))
            .cloned()
            .collect();
        for w in idle {
            if !pick.contains(&w) {
                pick.push(w);
            }
        }
        if pick.len() < self.config.min {
            self.state = JobState::Waiting;
            return Vec::new();
        }
        if self.next_kind == StartKind::Lost {
            if self.restarts >= self.config.max_restarts {
                return self.fail(format!(
                    "the job lost workers more often than max_restarts = {} allows: {}",
                    self.config.max_restarts,
                    self.lost.join("; ")
                ));
            }
            self.restarts += 1;
        }
        pick.truncate(self.config.max);
        self.generation = self.generation.next();
        self.members = pick;
        self.preferred.clear();
        self.replica = ReplicaCheck::new(self.members.len());
        self.finished = vec![None; self.members.len()];
        self.final_stored = None;
        self.base = None;
        self.draining = None;
        self.state = JobState::Running;
        self.events.push(GenerationEvent {
            generation: self.generation,
            kind: self.next_kind,
            reason: std::mem::take(&mut self.next_reason),
            step: self.expected,
            workers: self.members.len() as u32,
        });
        vec![Effect::SendAssignment {
            generation: self.generation,
            members: self.members.clone(),
            resume_from: self.expected,
            state_floor: self.state_floor,
            checkpoint: self.checkpoint,
        }]
    }

    /// A running elastic job below its maximum drains its generation so idle workers
    /// can join at the next step boundary.
    fn maybe_grow(&mut self, idle: Vec<WorkerId>) -> Vec<Effect> {
        let room = self.config.max.saturating_sub(self.members.len());
        if room == 0 || idle.is_empty() || self.draining.is_some() {
            return Vec::new();
        }
        // Training must have started (the ranks agreed on their state) and not ended.
        if self.base.is_none() || self.finished.iter().any(|f| f.is_some()) {
            return Vec::new();
        }
        let joiners: Vec<String> = idle.iter().take(room).map(|w| w.to_string()).collect();
        let reason = if joiners.len() == 1 {
            format!("worker {} joined", joiners[0])
        } else {
            format!("workers {} joined", joiners.join(", "))
        };
        self.next_kind = StartKind::Joined;
        self.next_reason = reason.clone();
        self.draining = Some(vec![None; self.members.len()]);
        vec![Effect::DrainGeneration {
            generation: self.generation,
            workers: self.members.clone(),
            reason,
        }]
    }

    fn rank_of(&self, worker: &WorkerId) -> Option<Rank> {
        self.members
            .iter()
            .position(|m| m == worker)
            .map(|r| Rank(r as u32))
    }

    fn on_lost(&mut self, worker: &WorkerId, detail: &str) -> Vec<Effect> {
        if self.state != JobState::Running {
            self.preferred.retain(|w| w != worker);
            return Vec::new();
        }
        let Some(rank) = self.rank_of(worker) else {
            return Vec::new();
        };
        // A member that already stopped to leave is gone as planned, not lost.
        if let Some(stops) = &self.draining {
            if stops
                .get(rank.index())
                .copied()
                .flatten()
                .is_some_and(|s| s.leaving)
            {
                return Vec::new();
            }
        }
        let message = format!(
            "worker {worker} (rank {rank}, {detail}) was lost in generation {}",
            self.generation
        );
        self.lose_member(worker, rank, detail, message)
    }

    /// A member is gone: under [`LossPolicy::Fail`] the job fails with `message`; under
    /// [`LossPolicy::NewGeneration`] the survivors stop and the job waits for the next
    /// generation, which continues from the newest state a member holds.
    fn lose_member(
        &mut self,
        lost: &WorkerId,
        rank: Rank,
        detail: &str,
        message: String,
    ) -> Vec<Effect> {
        self.lost.push(format!(
            "worker {lost} (rank {rank}, {detail}) in generation {}",
            self.generation
        ));
        match self.config.policy {
            LossPolicy::Fail => {
                self.members.retain(|m| m != lost);
                self.fail(message)
            }
            LossPolicy::NewGeneration => {
                let survivors: Vec<WorkerId> = std::mem::take(&mut self.members)
                    .into_iter()
                    .filter(|m| m != lost)
                    .collect();
                self.close_generation();
                self.preferred = survivors.clone();
                self.next_kind = StartKind::Lost;
                self.next_reason = format!("worker {lost} (rank {rank}) lost");
                self.state = JobState::Waiting;
                self.wait_token += 1;
                vec![
                    Effect::CancelGeneration {
                        generation: self.generation,
                        workers: survivors,
                        reason: message,
                    },
                    // One that is only stalled (frozen, partitioned) must not be handed
                    // the next generation: it is detached, and comes back as a new
                    // worker once it is alive again.
                    Effect::Expel {
                        worker: lost.clone(),
                    },
                    Effect::WaitDeadline {
                        token: self.wait_token,
                    },
                ]
            }
        }
    }

    /// Folds the ending generation's verified steps into the job's count.
    fn close_generation(&mut self) {
        self.verified_hw = self.verified_steps();
        self.expected = Step(self.verified_hw.max(self.expected.0));
        self.base = None;
        self.draining = None;
        self.replica = ReplicaCheck::new(self.members.len().max(1));
    }

    fn on_step(&mut self, rank: Rank, step: Step, hash: u64) -> Vec<Effect> {
        if self.state != JobState::Running || step.0 == 0 {
            return Vec::new();
        }
        if let Some((b, _)) = self.base {
            if step <= b {
                return Vec::new();
            }
        }
        match self.replica.record(step.0, rank.0, hash) {
            Ok(()) => Vec::new(),
            Err(d) => self.fail(d.to_string()),
        }
    }

    fn on_resumed(&mut self, rank: Rank, step: Step, hash: u64, fresh: bool) -> Vec<Effect> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        match self.base {
            None => {
                self.base = Some((step, hash));
                if fresh {
                    // A new line of state (checkpoint or initial parameters): what
                    // workers kept from earlier generations no longer counts.
                    self.state_floor = self.generation;
                }
                if let Some(e) = self.events.last_mut() {
                    e.step = step;
                }
                Vec::new()
            }
            Some((s, h)) if s == step && h == hash => Vec::new(),
            Some((s, h)) => self.fail(format!(
                "the ranks of generation {} started from different states: one from step {s} (parameter hash {h:016x}), rank {rank} from step {step} ({hash:016x})",
                self.generation
            )),
        }
    }

    fn on_stopped(&mut self, rank: Rank, report: StopReport) -> Vec<Effect> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        let world = self.members.len();
        let stops = self.draining.get_or_insert_with(|| vec![None; world]);
        if let Some(slot) = stops.get_mut(rank.index()) {
            *slot = Some(report);
        }
        if report.leaving {
            if let Some(w) = self.members.get(rank.index()).cloned() {
                let reason = format!("worker {w} (rank {rank}) left");
                if self.next_kind == StartKind::Left && !self.next_reason.is_empty() {
                    self.next_reason = format!("{}; {reason}", self.next_reason);
                } else {
                    self.next_kind = StartKind::Left;
                    self.next_reason = reason;
                }
                self.leaving.push(w);
            }
        }
        let Some(all) = self
            .draining
            .as_ref()
            .and_then(|s| s.iter().copied().collect::<Option<Vec<StopReport>>>())
        else {
            return Vec::new();
        };
        let step = all.iter().map(|s| s.step).max().unwrap_or_default();
        let members = std::mem::take(&mut self.members);
        self.close_generation();
        self.expected = step;
        self.preferred = members
            .iter()
            .filter(|w| !self.leaving.contains(w))
            .cloned()
            .collect();
        self.state = JobState::Waiting;
        self.wait_token += 1;
        vec![
            Effect::Release { workers: members },
            Effect::WaitDeadline {
                token: self.wait_token,
            },
        ]
    }

    fn on_wait_expired(&mut self, token: u64) -> Vec<Effect> {
        if self.state != JobState::Waiting || token != self.wait_token {
            return Vec::new();
        }
        let lost = if self.lost.is_empty() {
            "none lost".to_string()
        } else {
            self.lost.join("; ")
        };
        self.fail(format!(
            "fewer than {} workers for max_wait_secs after generation {}; lost workers: {lost}",
            self.config.min, self.generation
        ))
    }

    fn on_finished(&mut self, rank: Rank, steps: Step) -> Vec<Effect> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        if let Some(slot) = self.finished.get_mut(rank.index()) {
            *slot = Some(steps);
        }
        self.try_complete()
    }

    /// Completes the job once every rank has finished with the same step count, all of
    /// those steps were verified, and the final checkpoint is stored.
    fn try_complete(&mut self) -> Vec<Effect> {
        let Some(done) = self.finished.iter().copied().collect::<Option<Vec<Step>>>() else {
            return Vec::new();
        };
        let steps = done.first().copied().unwrap_or_default();
        if let Some((r, s)) = done.iter().enumerate().find(|(_, s)| **s != steps) {
            return self.fail(format!(
                "ranks finished after different step counts: rank 0 after {steps}, rank {r} after {s}"
            ));
        }
        let Some((base, _)) = self.base else {
            return self.fail(format!(
                "every rank of generation {} finished without reporting where it started",
                self.generation
            ));
        };
        // Steps are counted over the whole job; a generation only sees its own.
        let expected = steps.0.saturating_sub(base.0);
        if self.replica.verified() != expected || self.replica.pending() > 0 {
            return self.fail(format!(
                "every rank finished after step {steps}, but only {} of the generation's {expected} steps were verified across replicas",
                self.replica.verified()
            ));
        }
        match self.final_stored {
            Some(s) if s == steps => {
                self.verified_hw = self.verified_steps();
                let workers = std::mem::take(&mut self.members);
                self.state = JobState::Completed;
                vec![
                    Effect::Release { workers },
                    Effect::EndJob {
                        state: JobState::Completed,
                        error: None,
                    },
                ]
            }
            Some(s) => self.fail(format!(
                "the final checkpoint covers step {s}, but training ended at step {steps}"
            )),
            // Rank 0 stores the final checkpoint before it reports its end, so by the
            // time every rank has finished it must be there.
            None => self.fail("rank 0 finished without uploading the final checkpoint".into()),
        }
    }

    fn on_failure(
        &mut self,
        rank: Rank,
        worker: &WorkerId,
        message: &str,
        lost_rank: Option<Rank>,
        lost_detail: &str,
    ) -> Vec<Effect> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        let g = self.generation;
        match lost_rank.and_then(|lr| self.members.get(lr.index()).cloned().map(|w| (lr, w))) {
            Some((lr, lost)) => {
                let msg = format!(
                    "worker {lost} (rank {lr}, {lost_detail}) was lost in generation {g}: rank {rank} reports: {message}"
                );
                self.lose_member(&lost, lr, lost_detail, msg)
            }
            None => self.fail(format!(
                "rank {rank} (worker {worker}) failed in generation {g}: {message}"
            )),
        }
    }

    fn fail(&mut self, message: String) -> Vec<Effect> {
        self.end(JobState::Failed, Some(message), "failed")
    }

    /// Ends the job: a running generation's members are told to stop.
    fn end(&mut self, state: JobState, error: Option<String>, reason: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        self.verified_hw = self.verified_steps();
        let workers = std::mem::take(&mut self.members);
        if !workers.is_empty() {
            effects.push(Effect::CancelGeneration {
                generation: self.generation,
                workers,
                reason: reason.to_string(),
            });
        }
        self.state = state;
        self.error = error.clone();
        effects.push(Effect::EndJob { state, error });
        effects
    }
}

#[cfg(test)]
mod tests;
