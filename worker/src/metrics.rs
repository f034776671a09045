//! What a worker exports on `/metrics`: its own steps, samples and all-reduces.
//!
//! One [`WorkerMetrics`] lives as long as the worker process and is shared (an `Arc`)
//! with every job it runs, so counters keep growing across jobs and generations, as
//! Prometheus expects of a process's counters. The step thread updates it with a few
//! atomic operations per step and never allocates or locks.

use ringtrain_core::metrics::{Counter, Exposition, Gauge, Histogram, Kind, SECONDS_BUCKETS};

/// The worker's counters, gauge and histograms.
#[derive(Debug)]
pub struct WorkerMetrics {
    steps: Counter,
    samples: Counter,
    step_seconds: Histogram,
    allreduce_bytes: Counter,
    allreduce_seconds: Histogram,
    generation: Gauge,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            steps: Counter::new(),
            samples: Counter::new(),
            step_seconds: Histogram::new(SECONDS_BUCKETS),
            allreduce_bytes: Counter::new(),
            allreduce_seconds: Histogram::new(SECONDS_BUCKETS),
            generation: Gauge::new(),
        }
    }
}

impl WorkerMetrics {
    /// A training step this worker finished: `rows` of its own shard, in `seconds`.
    pub fn record_step(&self, rows: usize, seconds: f64) {
        self.step_seconds.observe(seconds);
        self.samples.add(rows as u64);
        // Last, so a scrape never sees more steps than step-time observations.
        self.steps.add(1);
    }

    /// An all-reduce this worker took part in: a buffer of `bytes`, in `seconds`.
    pub fn record_allreduce(&self, bytes: usize, seconds: f64) {
        self.allreduce_bytes.add(bytes as u64);
        self.allreduce_seconds.observe(seconds);
    }

    /// The generation this worker was last assigned.
    pub fn set_generation(&self, generation: u64) {
        self.generation.set(generation as f64);
    }

    /// Steps finished so far.
    pub fn steps(&self) -> u64 {
        self.steps.get()
    }

    /// The page `/metrics` serves.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "ringtrain_steps_total",
            Kind::Counter,
            "Training steps this worker finished.",
        )
        .sample("ringtrain_steps_total", &[], self.steps.get() as f64);
        e.family(
            "ringtrain_samples_total",
            Kind::Counter,
            "Training examples this worker computed gradients on (its own rows of each global batch).",
        )
        .sample("ringtrain_samples_total", &[], self.samples.get() as f64);
        e.family(
            "ringtrain_step_seconds",
            Kind::Histogram,
            "Wall time of one training step on this worker: compute, all-reduce, optimizer and reporting.",
        )
        .histogram("ringtrain_step_seconds", &[], &self.step_seconds.snapshot());
        e.family(
            "ringtrain_allreduce_bytes_total",
            Kind::Counter,
            "Bytes of buffers this worker all-reduced (gradients and metric sums; each crosses the wire about 2(n-1)/n times).",
        )
        .sample(
            "ringtrain_allreduce_bytes_total",
            &[],
            self.allreduce_bytes.get() as f64,
        );
        e.family(
            "ringtrain_allreduce_seconds",
            Kind::Histogram,
            "Wall time of one ring all-reduce on this worker, waiting for peers included.",
        )
        .histogram(
            "ringtrain_allreduce_seconds",
            &[],
            &self.allreduce_seconds.snapshot(),
        );
        e.family(
            "ringtrain_generation",
            Kind::Gauge,
            "The generation of the job this worker was last assigned (0 before any).",
        )
        .sample("ringtrain_generation", &[], self.generation.get());
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_and_an_all_reduce_show_up_in_the_page() {
        let m = WorkerMetrics::default();
        m.set_generation(3);
        m.record_allreduce(4096, 0.002);
        m.record_step(16, 0.004);
        let page = m.render();
        for line in [
            "ringtrain_steps_total 1",
            "ringtrain_samples_total 16",
            "ringtrain_allreduce_bytes_total 4096",
            "ringtrain_generation 3",
            "ringtrain_step_seconds_bucket{le=\"0.005\"} 1",
            "ringtrain_step_seconds_bucket{le=\"0.0025\"} 0",
            "ringtrain_step_seconds_count 1",
            "ringtrain_allreduce_seconds_bucket{le=\"+Inf\"} 1",
            "ringtrain_allreduce_seconds_sum 0.002",
        ] {
            assert!(page.lines().any(|l| l == line), "{line:?} missing:\n{page}");
        }
        for family in [
            "ringtrain_steps_total counter",
            "ringtrain_step_seconds histogram",
            "ringtrain_generation gauge",
        ] {
            assert!(page.contains(&format!("# TYPE {family}\n")), "{page}");
        }
    }
}
