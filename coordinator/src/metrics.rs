//! What a coordinator exports on `/metrics`: gauges of its jobs and workers, read from its
//! state at scrape time (nothing is counted on the request path).
//!
//! - `ringtrain_jobs{state}`: jobs per state, every state present (zeros included), so a
//!   dashboard's query never meets a missing series;
//! - `ringtrain_workers{state}`: attached workers, `idle` or `busy` (assigned to a job);
//!   a lost worker is forgotten at once, so it counts in neither;
//! - `ringtrain_generation{job,name}`: the generation of each job that has not ended
//!   (ended jobs are dropped, so the series count does not grow with history);
//! - `ringtrain_leader`: 1 while this coordinator leads (serves), 0 on a standby, whose
//!   other gauges are then empty.
//!
//! - `ringtrain_epsilon_spent{job,name}`: the privacy budget each DP-SGD job that has not
//!   ended has spent, as of its last epoch (the ε of its status, at its δ); jobs without
//!   `[privacy]` have no series.

use ringtrain_core::metrics::{Exposition, Kind};

use crate::job_machine::JobState;

/// The coordinator's gauges at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterGauges {
    /// Jobs per state, in [`JobState::ALL`] order.
    pub jobs: [u64; JobState::ALL.len()],
    /// Attached workers not assigned to a job.
    pub idle_workers: u64,
    /// Attached workers assigned to a job.
    pub busy_workers: u64,
    /// `(job id, job name, generation)` of every job that has not ended, oldest first.
    pub generations: Vec<(String, String, u64)>,
    /// `(job id, job name, epsilon spent)` of every DP-SGD job that has not ended.
    pub epsilons: Vec<(String, String, f64)>,
    /// Whether this coordinator leads (serves calls).
    pub leader: bool,
}

impl ClusterGauges {
    /// The page `/metrics` serves.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "ringtrain_jobs",
            Kind::Gauge,
            "Jobs known to this coordinator, by state.",
        );
        for (state, n) in JobState::ALL.iter().zip(self.jobs) {
            e.sample("ringtrain_jobs", &[("state", state.as_str())], n as f64);
        }
        e.family(
            "ringtrain_workers",
            Kind::Gauge,
            "Workers attached to this coordinator: idle, or busy (assigned to a job).",
        )
        .sample(
            "ringtrain_workers",
            &[("state", "idle")],
            self.idle_workers as f64,
        )
        .sample(
            "ringtrain_workers",
            &[("state", "busy")],
            self.busy_workers as f64,
        );
        e.family(
            "ringtrain_generation",
            Kind::Gauge,
            "Current generation of each job that has not ended.",
        );
        for (id, name, generation) in &self.generations {
            e.sample(
                "ringtrain_generation",
                &[("job", id), ("name", name)],
                *generation as f64,
            );
        }
        e.family(
            "ringtrain_epsilon_spent",
            Kind::Gauge,
            "Privacy budget (epsilon at the job's delta) spent by each DP-SGD job that has \
             not ended, as of its last epoch.",
        );
        for (id, name, epsilon) in &self.epsilons {
            e.sample(
                "ringtrain_epsilon_spent",
                &[("job", id), ("name", name)],
                *epsilon,
            );
        }
        e.family(
            "ringtrain_leader",
            Kind::Gauge,
            "1 while this coordinator leads and serves calls, 0 on a standby.",
        )
        .sample("ringtrain_leader", &[], if self.leader { 1.0 } else { 0.0 });
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_state_is_present_and_job_names_are_escaped() {
        let mut g = ClusterGauges {
            idle_workers: 1,
            busy_workers: 2,
            generations: vec![("j-1-ab".into(), "my \"mlp\"".into(), 4)],
            epsilons: vec![("j-1-ab".into(), "my \"mlp\"".into(), 1.25)],
            leader: true,
            ..ClusterGauges::default()
        };
        g.jobs[JobState::ALL
            .iter()
            .position(|s| *s == JobState::Running)
            .unwrap()] = 1;
        let page = g.render();
        for line in [
            "ringtrain_jobs{state=\"submitted\"} 0",
            "ringtrain_jobs{state=\"waiting\"} 0",
            "ringtrain_jobs{state=\"running\"} 1",
            "ringtrain_jobs{state=\"completed\"} 0",
            "ringtrain_jobs{state=\"failed\"} 0",
            "ringtrain_jobs{state=\"cancelled\"} 0",
            "ringtrain_workers{state=\"idle\"} 1",
            "ringtrain_workers{state=\"busy\"} 2",
            "ringtrain_generation{job=\"j-1-ab\",name=\"my \\\"mlp\\\"\"} 4",
            "ringtrain_epsilon_spent{job=\"j-1-ab\",name=\"my \\\"mlp\\\"\"} 1.25",
            "ringtrain_leader 1",
        ] {
            assert!(page.lines().any(|l| l == line), "{line:?} missing:\n{page}");
        }
        assert!(page.contains("# TYPE ringtrain_jobs gauge\n"));
    }
}
