//! Job identity, the job state machine and the replica check: pure, no I/O.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A job's id (`j-<n>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub String);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A worker's id at this coordinator (`w-<n>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job is in its life.
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

    /// Whether the machine allows moving to `next`.
    pub fn can_move_to(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Submitted, Waiting | Running | Cancelled | Failed)
                | (Waiting, Running | Cancelled | Failed)
                | (Running, Running | Waiting | Completed | Failed | Cancelled)
        )
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_is_counted_and_divergence_reported() {
        let mut c = ReplicaCheck::new(3);
        for r in 0..3 {
            c.record(1, r, 42).unwrap();
        }
        c.record(2, 0, 7).unwrap();
        assert_eq!(c.verified(), 1);
        let d = c.record(2, 2, 8).unwrap_err();
        assert_eq!(d.first, (0, 7));
        assert_eq!(d.other, (2, 8));
        assert!(d.to_string().contains("step 2"));
    }

    #[test]
    fn terminal_states_do_not_move() {
        for s in [JobState::Completed, JobState::Failed, JobState::Cancelled] {
            assert!(s.is_terminal());
            assert!(!s.can_move_to(JobState::Running));
        }
        assert!(JobState::Waiting.can_move_to(JobState::Running));
    }
}
