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
//! Submitted ──not enough workers──▶ Waiting ──enough──▶ Running(g) ──all ranks verified──▶ Completed
//!     │                               ▲                   │  │
//!     └──────────enough──────────────────────────────────▶│  ├─ worker lost (policy NewGeneration) ─▶ Waiting ─▶ Running(g+1)
//!                                                         │  └─ lost (policy Fail) / failure / divergence ─▶ Failed
//! any non-terminal state ──cancel──▶ Cancelled
//! ```
//!
//! A job is completed only when every rank of the generation has reported its end with
//! the same step count, every one of those steps was verified across all replicas, and
//! the final checkpoint for that step is stored: rank 0's end alone never completes it.

use std::collections::HashMap;
use std::fmt;

use ringtrain_core::{Generation, Rank, Step, WorkerId};
use serde::{Deserialize, Serialize};

/// Where a job is in its life. The API and `--json` output use [`JobState::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted, not yet considered for scheduling.
    Submitted,
    /// Waiting for enough idle workers.
    Waiting,
    /// Training in some generation.
    Running,
    /// Finished; outputs written.
    Completed,
    /// Stopped by an error.
    Failed,
    /// Stopped by a user.
    Cancelled,
}

impl JobState {
    /// Lowercase name used in the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "submitted",
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Completed, failed or cancelled: nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What a running job does when it loses a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossPolicy {
    /// The job fails, naming the lost worker and its rank (today's behaviour).
    #[default]
    Fail,
    /// The generation ends and the job waits for enough workers to start the next one
    /// from the last step every replica completed (recovery, issue 7).
    NewGeneration,
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The scheduler offers these idle workers (oldest first); the job takes what it
    /// needs or, with too few, waits.
    WorkersAvailable {
        /// Idle workers the job may take.
        idle: Vec<WorkerId>,
    },
    /// A worker went away. `detail` (its address, ...) goes into the error message.
    WorkerLost {
        /// The worker.
        worker: WorkerId,
        /// Where it was, for the message.
        detail: String,
    },
    /// A worker attached while the job runs. A job's world size is fixed, so a joiner
    /// does not change a running generation; it waits for the next job or generation.
    WorkerJoined {
        /// The worker.
        worker: WorkerId,
    },
    /// A rank's parameter hash after a step.
    StepReported {
        /// The rank.
        rank: Rank,
        /// The step (from 1).
        step: Step,
        /// xxh3-64 of its parameters after the update.
        param_hash: u64,
    },
    /// A rank finished training after `steps` steps.
    RankFinished {
        /// The rank.
        rank: Rank,
        /// Steps it took.
        steps: Step,
    },
    /// A rank reported a failure; `lost_rank` when it lost a ring peer.
    Failure {
        /// The reporting rank.
        rank: Rank,
        /// Its worker.
        worker: WorkerId,
        /// What went wrong.
        message: String,
        /// The peer it lost, if that was the cause.
        lost_rank: Option<Rank>,
        /// Where that peer was (its address), for the message.
        lost_detail: String,
        /// Whether the blame is settled. A rank whose neighbour failed sees its own link
        /// break too and may report the neighbour, not the worker that really died; while
        /// the peer it names is still attached, the report is only a suspicion and is
        /// looked at again after a grace (by then a dead worker's detach has arrived and
        /// named the right one).
        confirmed: bool,
    },
    /// Rank 0 uploaded a checkpoint of the current generation.
    CheckpointUploaded {
        /// Steps it covers.
        step: Step,
        /// Whether it is the end-of-training checkpoint.
        final_: bool,
    },
    /// A checkpoint asked for by [`Effect::WriteCheckpoint`] is durable.
    CheckpointStored {
        /// Steps it covers.
        step: Step,
        /// Whether it is the end-of-training checkpoint.
        final_: bool,
    },
    /// The service could not carry out an effect (an assignment that could not be
    /// delivered, a checkpoint that could not be written).
    Fault {
        /// What went wrong.
        message: String,
    },
    /// A user cancelled the job.
    Cancel,
}

/// What the service must do after an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send each member its assignment for `generation`; `members[r]` is rank r.
    SendAssignment {
        /// The new generation.
        generation: Generation,
        /// Members in ring order.
        members: Vec<WorkerId>,
        /// The step the generation starts from (0: from the initial parameters).
        resume_from: Step,
    },
    /// Tell these workers to stop `generation` and free them.
    CancelGeneration {
        /// The generation.
        generation: Generation,
        /// Whom to tell.
        workers: Vec<WorkerId>,
        /// Why (shown in the workers' logs).
        reason: String,
    },
    /// Free these workers without telling them anything (they finished by themselves).
    Release {
        /// The workers.
        workers: Vec<WorkerId>,
    },
    /// Store the uploaded checkpoint, then report [`Event::CheckpointStored`].
    WriteCheckpoint {
        /// Steps it covers.
        step: Step,
        /// Whether it is the end-of-training checkpoint.
        final_: bool,
    },
    /// Feed this event again after a grace period (an unconfirmed loss report).
    ConfirmLater {
        /// The event, marked confirmed.
        event: Box<Event>,
    },
    /// The job reached a terminal state.
    EndJob {
        /// Completed, failed or cancelled.
        state: JobState,
        /// Why it failed.
        error: Option<String>,
    },
}

/// A message from a rank that is not a member of the job's current generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAMember {
    /// What was expected and what arrived, for the caller's error.
    pub message: String,
}

impl fmt::Display for NotAMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// One job's lifecycle.
#[derive(Debug, Clone)]
pub struct JobMachine {
    state: JobState,
    world: usize,
    policy: LossPolicy,
    generation: Generation,
    members: Vec<WorkerId>,
    replica: ReplicaCheck,
    /// Steps every replica completed and agreed on, over the whole job.
    resume_from: Step,
    finished: Vec<Option<Step>>,
    final_stored: Option<Step>,
    error: Option<String>,
}

impl JobMachine {
    /// A submitted job that needs `world` workers per generation.
    pub fn new(world: usize, policy: LossPolicy) -> Self {
        JobMachine {
            state: JobState::Submitted,
            world: world.max(1),
            policy,
            generation: Generation(0),
            members: Vec::new(),
            replica: ReplicaCheck::new(world.max(1)),
            resume_from: Step(0),
            finished: Vec::new(),
            final_stored: None,
            error: None,
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

    /// Workers per generation.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Members of the running generation in rank order (empty when not running).
    pub fn members(&self) -> &[WorkerId] {
        &self.members
    }

    /// Steps whose hashes every replica reported and agreed on, over the whole job.
    pub fn verified_steps(&self) -> u64 {
        self.resume_from.0 + self.replica.verified()
    }

    /// Why the job failed, once it has.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
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
                if final_ && self.state == JobState::Running {
                    self.final_stored = Some(step);
                    self.try_complete()
                } else {
                    Vec::new()
                }
            }
            Event::Fault { message } => self.fail(message),
            Event::Cancel => self.end(JobState::Cancelled, None, "cancelled"),
        }
    }

    fn on_available(&mut self, idle: Vec<WorkerId>) -> Vec<Effect> {
        match self.state {
            JobState::Submitted | JobState::Waiting => {}
            _ => return Vec::new(),
        }
        if idle.len() < self.world {
            self.state = JobState::Waiting;
            return Vec::new();
        }
        self.generation = self.generation.next();
        self.members = idle.into_iter().take(self.world).collect();
        self.replica = ReplicaCheck::new(self.world);
        self.finished = vec![None; self.world];
        self.final_stored = None;
        self.state = JobState::Running;
        vec![Effect::SendAssignment {
            generation: self.generation,
            members: self.members.clone(),
            resume_from: self.resume_from,
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
            return Vec::new();
        }
        let Some(rank) = self.rank_of(worker) else {
            return Vec::new();
        };
        let message = format!(
            "worker {worker} (rank {rank}, {detail}) was lost in generation {}",
            self.generation
        );
        self.lose_member(worker, message)
    }

    /// A member is gone: under [`LossPolicy::Fail`] the job fails with `message`; under
    /// [`LossPolicy::NewGeneration`] the survivors stop and the job waits for the next
    /// generation, which resumes from the last step every replica agreed on.
    fn lose_member(&mut self, lost: &WorkerId, message: String) -> Vec<Effect> {
        match self.policy {
            LossPolicy::Fail => {
                self.members.retain(|m| m != lost);
                self.fail(message)
            }
            LossPolicy::NewGeneration => {
                let survivors: Vec<WorkerId> = std::mem::take(&mut self.members)
                    .into_iter()
                    .filter(|m| m != lost)
                    .collect();
                self.resume_from = Step(self.resume_from.0 + self.replica.verified());
                self.replica = ReplicaCheck::new(self.world);
                self.state = JobState::Waiting;
                vec![Effect::CancelGeneration {
                    generation: self.generation,
                    workers: survivors,
                    reason: message,
                }]
            }
        }
    }

    fn on_step(&mut self, rank: Rank, step: Step, hash: u64) -> Vec<Effect> {
        if self.state != JobState::Running || step.0 == 0 {
            return Vec::new();
        }
        match self.replica.record(step.0, rank.0, hash) {
            Ok(()) => Vec::new(),
            Err(d) => self.fail(d.to_string()),
        }
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
        // Steps are counted over the whole job; a generation only sees its own.
        let expected = steps.0.saturating_sub(self.resume_from.0);
        if self.replica.verified() != expected || self.replica.pending() > 0 {
            return self.fail(format!(
                "every rank finished after step {steps}, but only {} of the generation's {expected} steps were verified across replicas",
                self.replica.verified()
            ));
        }
        match self.final_stored {
            Some(s) if s == steps => {
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
                self.lose_member(&lost, msg)
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

/// Checks that every replica reports the same parameter hash after every step.
#[derive(Debug, Clone)]
pub struct ReplicaCheck {
    world: usize,
    pending: HashMap<u64, (u64, u32, usize)>,
    verified: u64,
}

/// Replicas disagreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The step.
    pub step: u64,
    /// Rank whose hash arrived first, and its hash.
    pub first: (u32, u64),
    /// Rank that disagreed, and its hash.
    pub other: (u32, u64),
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replicas diverged at step {}: rank {} has parameter hash {:016x}, rank {} has {:016x}",
            self.step, self.first.0, self.first.1, self.other.0, self.other.1
        )
    }
}

impl ReplicaCheck {
    /// A check for `world` replicas.
    pub fn new(world: usize) -> Self {
        ReplicaCheck {
            world,
            pending: HashMap::new(),
            verified: 0,
        }
    }

    /// Records `rank`'s hash after `step`.
    pub fn record(&mut self, step: u64, rank: u32, hash: u64) -> Result<(), Divergence> {
        let entry = self.pending.entry(step).or_insert((hash, rank, 0));
        if entry.0 != hash {
            return Err(Divergence {
                step,
                first: (entry.1, entry.0),
                other: (rank, hash),
            });
        }
        entry.2 += 1;
        if entry.2 == self.world {
            self.pending.remove(&step);
            self.verified += 1;
        }
        Ok(())
    }

    /// Steps every replica agreed on.
    pub fn verified(&self) -> u64 {
        self.verified
    }

    /// Steps some but not yet all replicas reported.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
#[path = "job_machine_tests.rs"]
mod tests;
