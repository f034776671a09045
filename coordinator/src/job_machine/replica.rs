//! The replica check: every rank must report the same parameter hash after every step.

use std::collections::HashMap;
use std::fmt;

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
