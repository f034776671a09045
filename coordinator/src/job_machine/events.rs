//! The vocabulary of the job state machine: its states, the events it is fed, the
//! effects it returns, and what it shows and saves (generation events, snapshots).

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
    /// Every state, in lifecycle order (what `/metrics` lists, zeros included).
    pub const ALL: [JobState; 6] = [
        JobState::Submitted,
        JobState::Waiting,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ];

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
    /// The job fails, naming the lost worker and its rank.
    Fail,
    /// The generation ends and the job waits for enough workers to start the next one
    /// from the newest state a member holds (recovery).
    #[default]
    NewGeneration,
}

/// Why a generation started (the `kind` of a status event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// The job's first generation.
    Start,
    /// After a worker was lost.
    Lost,
    /// Idle workers joined a running elastic job.
    Joined,
    /// A member left gracefully (SIGTERM).
    Left,
    /// The job was resumed from a run directory (`--resume`).
    Resumed,
    /// A restarted coordinator picked the job up again.
    Restarted,
}

impl StartKind {
    /// The name in the status JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Start => "start",
            StartKind::Lost => "lost",
            StartKind::Joined => "joined",
            StartKind::Left => "left",
            StartKind::Resumed => "resumed",
            StartKind::Restarted => "restarted",
        }
    }
}

/// One generation's start, as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationEvent {
    /// The generation.
    pub generation: Generation,
    /// Why it started.
    pub kind: StartKind,
    /// Human text, e.g. "worker w-3 (rank 2) lost".
    pub reason: String,
    /// The step it began from.
    pub step: Step,
    /// Its member count.
    pub workers: u32,
}

/// How a job's generations are sized and how much loss it tolerates.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineConfig {
    /// Fewest members a generation runs with.
    pub min: usize,
    /// Most members a generation takes.
    pub max: usize,
    /// What a loss does.
    pub policy: LossPolicy,
    /// Generations started after losses before the job fails.
    pub max_restarts: u32,
    /// Why the first generation starts (start, or resumed from a run directory).
    pub first: StartKind,
    /// The first generation's reason text.
    pub first_reason: String,
    /// The newest stored checkpoint's step (a resumed run's), the fallback state.
    pub checkpoint: Option<Step>,
}

impl MachineConfig {
    /// Exactly `world` workers, recovery on.
    pub fn fixed(world: usize) -> Self {
        MachineConfig {
            min: world.max(1),
            max: world.max(1),
            policy: LossPolicy::NewGeneration,
            max_restarts: 100,
            first: StartKind::Start,
            first_reason: "job started".into(),
            checkpoint: None,
        }
    }
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The scheduler offers these idle workers (oldest first). A waiting job takes what
    /// it needs or keeps waiting; a running elastic job below its maximum drains its
    /// generation so they can join at the next step boundary.
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
    /// A worker attached. The scheduler follows with [`Event::WorkersAvailable`].
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
    /// Where a rank of the running generation starts: after the ranks agreed on a state.
    Resumed {
        /// The rank.
        rank: Rank,
        /// The step of the state it starts from.
        step: Step,
        /// The state's parameter hash.
        param_hash: u64,
        /// Whether the state came from a checkpoint or the initial parameters (a new
        /// line of state: older in-memory state no longer counts).
        fresh: bool,
    },
    /// A rank stopped after `step` at a drain or a leave and keeps its state.
    Stopped {
        /// The rank.
        rank: Rank,
        /// Steps it completed.
        step: Step,
        /// Its parameter hash.
        param_hash: u64,
        /// Whether its worker is leaving the cluster.
        leaving: bool,
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
    /// The wait that [`Effect::WaitDeadline`] asked for is over.
    WaitExpired {
        /// The deadline's token.
        token: u64,
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
        /// The step the machine expects the generation to start from (the ranks settle
        /// the exact one among themselves and report it in [`Event::Resumed`]).
        resume_from: Step,
        /// State a worker kept from this generation or later counts.
        state_floor: Generation,
        /// The newest stored checkpoint, the fallback when no member holds state.
        checkpoint: Option<Step>,
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
    /// Ask the members to stop `generation` after the same step and report it.
    DrainGeneration {
        /// The generation.
        generation: Generation,
        /// Whom to tell.
        workers: Vec<WorkerId>,
        /// Why.
        reason: String,
    },
    /// Free these workers without telling them anything (they finished or stopped by
    /// themselves).
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
    /// Detach this worker (its attach stream ends; a live one reattaches afresh).
    Expel {
        /// The worker.
        worker: WorkerId,
    },
    /// Feed this event again after a grace period (an unconfirmed loss report).
    ConfirmLater {
        /// The event, marked confirmed.
        event: Box<Event>,
    },
    /// Feed [`Event::WaitExpired`] with this token after the job's `max_wait_secs`.
    WaitDeadline {
        /// Identifies this wait; a later wait gets a new token.
        token: u64,
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

/// What a restarted coordinator knows of a job from its store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineSnapshot {
    /// The state when it was saved.
    pub state: JobState,
    /// The last generation started.
    pub generation: Generation,
    /// Generations from this one on hold valid in-memory state.
    pub state_floor: Generation,
    /// Steps verified so far.
    pub verified: u64,
    /// Generations started after losses.
    pub restarts: u32,
    /// Every generation's start.
    pub events: Vec<GenerationEvent>,
    /// Every worker lost so far ("worker w-3 (rank 2) in generation 4").
    pub lost: Vec<String>,
    /// Members of the last generation, in rank order (preferred for the next).
    pub members: Vec<WorkerId>,
    /// The newest stored checkpoint.
    pub checkpoint: Option<Step>,
    /// Why it failed.
    pub error: Option<String>,
}
