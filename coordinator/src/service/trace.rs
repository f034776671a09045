//! A job's exported spans on the coordinator: `job` for the job's whole life and
//! `generation` for the running generation. The generation's W3C context travels in
//! every member's assignment, so the workers' `step` spans join the job's trace.
//!
//! The spans are held, never entered: a span ends when its last handle is dropped, so
//! replacing `generation` ends the previous one and [`JobTrace::end`] ends both.

use std::collections::HashMap;

use ringtrain_core::telemetry::context_of;
use ringtrain_core::JobId;
use tracing::{info_span, Span};

#[derive(Debug)]
pub(super) struct JobTrace {
    job: Span,
    generation: Span,
}

impl JobTrace {
    /// The `job` span of a job starting now. It is created in the caller's context: a
    /// submit's adapter runs the submit in the client's trace context (from the request
    /// metadata), which makes the job a child of the client's span.
    pub(super) fn start(id: &JobId, name: &str) -> Self {
        JobTrace {
            job: info_span!("job", job = %id, name, state = tracing::field::Empty),
            generation: Span::none(),
        }
    }

    /// A job with nothing to trace (restored after it ended).
    pub(super) fn none() -> Self {
        JobTrace {
            job: Span::none(),
            generation: Span::none(),
        }
    }

    /// Ends the previous generation's span and starts the next one's; returns its trace
    /// context for the assignments (empty when traces are not exported).
    pub(super) fn start_generation(
        &mut self,
        id: &JobId,
        generation: u64,
        world: usize,
    ) -> HashMap<String, String> {
        self.generation = info_span!(
            parent: &self.job,
            "generation",
            job = %id,
            generation,
            world
        );
        context_of(&self.generation)
    }

    /// Ends both spans, recording how the job ended.
    pub(super) fn end(&mut self, state: &str) {
        self.job.record("state", state);
        self.generation = Span::none();
        self.job = Span::none();
    }
}
