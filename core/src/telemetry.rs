//! Traces across processes: which training steps get spans, the W3C trace context that
//! ties one step's spans on every process into one trace, and the identity a process
//! learns only after it has started.
//!
//! Nothing here installs a subscriber or an exporter; the binary does that. Without the
//! OpenTelemetry layer installed every function here is a cheap no-op: carriers stay
//! empty and a received parent is ignored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and carrier key) holding the parent's trace and span id.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header (and carrier key) holding vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// The spans ringtrain exports over OTLP. The binary's exporter passes these names only,
/// so log-context spans (a worker's `assignment`) never become traces of their own.
pub const SPAN_NAMES: [&str; 8] = [
    "job",
    "generation",
    "step",
    "compute",
    "all_reduce",
    "optimizer",
    "checkpoint",
    "submit",
];

/// Steps traced from the start of every generation by default.
pub const DEFAULT_TRACE_FIRST_STEPS: u64 = 20;
/// After those, one step in this many is traced by default.
pub const DEFAULT_TRACE_EVERY_STEPS: u64 = 100;

/// Which training steps get spans: every step up to `first`, then every `every`-th
/// step. Every rank decides from the step number alone, so a traced step is traced on
/// all ranks and an untraced one creates no span anywhere (it costs one comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSampling {
    /// Steps 1..=first are all traced.
    pub first: u64,
    /// After `first`, steps that are multiples of this are traced (1: every step, 0:
    /// none).
    pub every: u64,
}

impl Default for StepSampling {
    fn default() -> Self {
        StepSampling {
            first: DEFAULT_TRACE_FIRST_STEPS,
            every: DEFAULT_TRACE_EVERY_STEPS,
        }
    }
}

impl StepSampling {
    /// Whether the 1-based `step` is traced.
    pub fn traces(&self, step: u64) -> bool {
        step <= self.first || (self.every > 0 && step.is_multiple_of(self.every))
    }
}

/// A trace context received from another process: the parent of spans made here.
#[derive(Debug, Clone, Default)]
pub struct RemoteParent(opentelemetry::Context);

impl RemoteParent {
    /// From the W3C header values (`traceparent`, `tracestate`), as they arrive in gRPC
    /// metadata. A missing or malformed `traceparent` gives an absent parent.
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        let mut carrier = HashMap::new();
        if let Some(v) = traceparent {
            carrier.insert(TRACEPARENT.to_string(), v.to_string());
        }
        if let Some(v) = tracestate {
            carrier.insert(TRACESTATE.to_string(), v.to_string());
        }
        Self::from_map(&carrier)
    }

    /// From a carrier map (an assignment's `trace_context`).
    pub fn from_map(carrier: &HashMap<String, String>) -> Self {
        if !carrier.contains_key(TRACEPARENT) {
            return RemoteParent::default();
        }
        RemoteParent(TraceContextPropagator::new().extract(carrier))
    }

    /// Whether a valid span context was received.
    pub fn is_present(&self) -> bool {
        self.0.span().span_context().is_valid()
    }

    /// Runs `fut` with this context current, so the spans it creates without an
    /// exported parent of their own become children of this one (a request handler's
    /// spans under the client's span).
    pub fn scope<F: std::future::Future>(self, fut: F) -> opentelemetry::context::WithContext<F> {
        use opentelemetry::context::FutureExt;
        fut.with_context(self.0)
    }

    /// Makes `span` a child of this context. Call it before the span is first entered;
    /// a no-op when no parent was received or the span is not exported.
    pub fn adopt(&self, span: &tracing::Span) {
        if self.is_present() {
            // An error only says the span is disabled or not exported: nothing to link.
            let _ = span.set_parent(self.0.clone());
        }
    }
}

/// The W3C trace context of `span` as carrier entries (`traceparent`, `tracestate`), to
/// send to another process; empty when the span is not exported.
pub fn context_of(span: &tracing::Span) -> HashMap<String, String> {
    let cx = span.context();
    let mut carrier = HashMap::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    }
    carrier
}

/// The `service.instance.id` of a process that learns it after it starts (a worker
/// gets its id from the coordinator when it registers, and a new one when it attaches
/// again). The code that learns it sets it; the exporter labels the spans it sends with
/// the latest value.
#[derive(Debug, Clone, Default)]
pub struct InstanceId(Arc<Mutex<(u64, Option<String>)>>);

impl InstanceId {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<String>)> {
        // The pair is replaced whole under the lock, so a poisoned one is still valid.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the id (a change bumps the version the exporter watches).
    pub fn set(&self, id: &str) {
        let mut g = self.lock();
        if g.1.as_deref() != Some(id) {
            g.0 += 1;
            g.1 = Some(id.to_string());
        }
    }

    /// The id, when it changed after version `seen`, with its version.
    pub fn changed_since(&self, seen: u64) -> Option<(u64, String)> {
        let g = self.lock();
        match &g.1 {
            Some(id) if g.0 != seen => Some((g.0, id.clone())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_steps_then_one_in_every_are_traced() {
        let s = StepSampling::default();
        let traced: Vec<u64> = (1..=450).filter(|&k| s.traces(k)).collect();
        let mut expected: Vec<u64> = (1..=20).collect();
        expected.extend([100, 200, 300, 400]);
        assert_eq!(traced, expected);
    }

    #[test]
    fn every_one_traces_all_and_every_zero_only_the_first() {
        let all = StepSampling { first: 0, every: 1 };
        assert!((1..=1000).all(|k| all.traces(k)));
        let first = StepSampling { first: 3, every: 0 };
        let traced: Vec<u64> = (1..=1000).filter(|&k| first.traces(k)).collect();
        assert_eq!(traced, vec![1, 2, 3]);
    }

    #[test]
    fn a_traceparent_round_trips_through_a_carrier() {
        // The example of the W3C Trace Context recommendation, section 3.2.
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let parent = RemoteParent::from_headers(Some(tp), Some("congo=t61rcWkgMzE"));
        assert!(parent.is_present());
        let sc = parent.0.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled());
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&parent.0, &mut carrier);
        assert_eq!(carrier.get(TRACEPARENT).map(String::as_str), Some(tp));
        assert_eq!(
            carrier.get(TRACESTATE).map(String::as_str),
            Some("congo=t61rcWkgMzE")
        );
    }

    #[test]
    fn a_missing_or_malformed_traceparent_is_no_parent() {
        assert!(!RemoteParent::from_headers(None, None).is_present());
        assert!(!RemoteParent::from_headers(Some("00-zz-yy-01"), None).is_present());
        assert!(!RemoteParent::from_map(&HashMap::new()).is_present());
    }

    #[test]
    fn without_an_exporter_a_span_has_no_context_to_send() {
        let span = tracing::info_span!("generation");
        assert!(context_of(&span).is_empty());
    }

    #[test]
    fn the_instance_id_reports_each_change_once() {
        let id = InstanceId::default();
        assert_eq!(id.changed_since(0), None);
        id.set("w-1");
        let (v, s) = id.changed_since(0).unwrap();
        assert_eq!(s, "w-1");
        assert_eq!(id.changed_since(v), None);
        id.set("w-1");
        assert_eq!(id.changed_since(v), None);
        id.set("w-7");
        assert_eq!(id.changed_since(v).map(|(_, s)| s), Some("w-7".to_string()));
    }
}
