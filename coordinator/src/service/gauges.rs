//! The coordinator's state counted for `/metrics` (one short lock per scrape).

use super::Coordinator;
use crate::job_machine::JobState;
use crate::metrics::ClusterGauges;

impl Coordinator {
    /// Jobs per state, workers idle and busy, and the generation (and a DP job's spent
    /// epsilon) of every job that has not ended. `leader` is not known here: it stays `false` for the caller to set.
    pub fn gauges(&self) -> ClusterGauges {
        let st = self.lock();
        let mut g = ClusterGauges::default();
        for job in st.jobs.values() {
            let state = job.machine.state();
            if let Some(i) = JobState::ALL.iter().position(|s| *s == state) {
                g.jobs[i] += 1;
            }
            if !state.is_terminal() {
                g.generations.push((
                    job.id.0.clone(),
                    job.file.name.clone(),
                    job.machine.generation().0,
                ));
                if let Some(p) = &job.status.borrow().privacy {
                    g.epsilons
                        .push((job.id.0.clone(), job.file.name.clone(), p.epsilon));
                }
            }
        }
        for (_, w) in st.workers.values() {
            if w.job.is_some() {
                g.busy_workers += 1;
            } else {
                g.idle_workers += 1;
            }
        }
        g
    }
}
