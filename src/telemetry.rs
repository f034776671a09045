//! What this process says about itself: log lines on stderr (text or JSON) and, when an
//! OTLP endpoint is set (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`), its spans
//! exported over OTLP/gRPC (Jaeger, an OpenTelemetry Collector).
//!
//! Only the spans named in [`ringtrain_core::telemetry::SPAN_NAMES`] are exported, with
//! warnings and errors as their events. The log filter (`RUST_LOG`) does not apply to
//! them, so `ringtrain local`'s quiet default still exports every step it samples.
//! The SDK honours `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` and `OTEL_BSP_*` itself;
//! `service.name` defaults to the process's role and `service.instance.id` to its id.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::resource::{EnvResourceDetector, ResourceDetector};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use ringtrain_core::telemetry::{InstanceId, SPAN_NAMES};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How long exiting waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

const SERVICE_NAME: &str = "service.name";
const SERVICE_INSTANCE_ID: &str = "service.instance.id";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

/// What a process exporting spans is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`, and the embedded coordinator of `local` and `bench train`.
    Coordinator,
    /// `worker`.
    Worker,
    /// `submit`: the client whose span a job's trace starts from.
    Client,
}

impl Role {
    /// The default `service.name` (`OTEL_SERVICE_NAME` or a `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES` replaces it).
    pub fn service_name(self) -> &'static str {
        match self {
            Role::Coordinator => "ringtrain-coordinator",
            Role::Worker => "ringtrain-worker",
            Role::Client => "ringtrain-cli",
        }
    }
}

/// Trace export of one process.
#[derive(Debug, Clone)]
pub struct Export {
    /// The OTLP/gRPC endpoint, e.g. `http://jaeger:4317`.
    pub endpoint: String,
    /// What this process is.
    pub role: Role,
    /// Its `service.instance.id`, set now or once it is known.
    pub instance: InstanceId,
}

/// The installed exporter, flushed by [`shutdown`].
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Installs the process's subscriber: log lines at `default_filter` (or `RUST_LOG`) and,
/// with `export`, the OTLP span exporter.
pub fn init(format: LogFormat, default_filter: &str, export: Option<Export>) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
    };
    let (spans, provider) = match export {
        Some(export) => {
            let provider = provider(&export)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("ringtrain"))
                // What a step's spans cost matters (they run inside the training loop):
                // no source locations, thread names or busy/idle timings.
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(tracing_subscriber::filter::filter_fn(exported));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .context("installing the log subscriber")?;
    *PROVIDER.lock().unwrap_or_else(|p| p.into_inner()) = provider;
    Ok(())
}

/// Sends the spans still buffered and stops the exporter (bounded by
/// [`FLUSH_TIMEOUT`]). Call once, at exit, while the async runtime still runs: the
/// exporter's connection lives on it.
pub fn shutdown() {
    let provider = PROVIDER.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(p) = provider {
        if let Err(e) = p.shutdown_with_timeout(FLUSH_TIMEOUT) {
            eprintln!("warning: exporting the last spans failed: {e}");
        }
    }
}

/// The spans and events the OTLP layer sees: ringtrain's named spans, and warnings and
/// errors (which become events of the span they happen in).
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    meta.target().starts_with("ringtrain")
        && if meta.is_span() {
            SPAN_NAMES.contains(&meta.name())
        } else {
            *meta.level() <= tracing::Level::WARN
        }
}

fn provider(export: &Export) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(export.endpoint.clone())
        .build()
        .with_context(|| {
            format!(
                "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) {:?}: cannot export traces there; \
                 expected an OTLP/gRPC URL such as http://jaeger:4317",
                export.endpoint
            )
        })?;
    // `builder()` starts from the SDK's environment detectors (OTEL_SERVICE_NAME,
    // OTEL_RESOURCE_ATTRIBUTES); the role's name applies only where they name none.
    let env = EnvResourceDetector::new().detect();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.is_empty())
        || env.get(&Key::new(SERVICE_NAME)).is_some();
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(export.role.service_name());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(WithInstance::new(exporter, export.instance.clone()))
        .with_resource(resource.build())
        .build())
}

/// An exporter whose resource gains `service.instance.id` once the process knows it (a
/// worker learns its id when it registers, after the exporter was built), unless
/// `OTEL_RESOURCE_ATTRIBUTES` already set one.
#[derive(Debug)]
struct WithInstance<E> {
    // A tokio mutex: the guard is held across the export's await, and the SDK never
    // exports concurrently, so it is never contended.
    inner: tokio::sync::Mutex<E>,
    instance: InstanceId,
    /// The resource the SDK gave the exporter.
    base: Mutex<Resource>,
    /// The instance id version last applied.
    seen: AtomicU64,
}

impl<E: SpanExporter> WithInstance<E> {
    fn new(inner: E, instance: InstanceId) -> Self {
        WithInstance {
            inner: tokio::sync::Mutex::new(inner),
            instance,
            base: Mutex::new(Resource::builder_empty().build()),
            seen: AtomicU64::new(0),
        }
    }

    /// The base resource with `service.instance.id = id` (an id the base has wins).
    fn labelled(&self, id: &str) -> Resource {
        let base = self.base.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if base.get(&Key::new(SERVICE_INSTANCE_ID)).is_some() {
            return base;
        }
        Resource::builder_empty()
            .with_attributes(
                base.iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attribute(KeyValue::new(SERVICE_INSTANCE_ID, id.to_string()))
            .build()
    }
}

impl<E: SpanExporter> SpanExporter for WithInstance<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut inner = self.inner.lock().await;
        if let Some((version, id)) = self
            .instance
            .changed_since(self.seen.load(Ordering::Acquire))
        {
            inner.set_resource(&self.labelled(&id));
            self.seen.store(version, Ordering::Release);
        }
        inner.export(batch).await
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.shutdown_with_timeout(timeout),
            // Only an export in flight holds the lock, and the SDK shuts down after it.
            Err(_) => Ok(()),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.force_flush(),
            Err(_) => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        *self.base.get_mut().unwrap_or_else(|p| p.into_inner()) = resource.clone();
        match self.instance.changed_since(0) {
            Some((version, id)) => {
                let labelled = self.labelled(&id);
                self.inner.get_mut().set_resource(&labelled);
                self.seen.store(version, Ordering::Release);
            }
            None => self.inner.get_mut().set_resource(resource),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An exporter that drops everything (only the resource handling is under test).
    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            Ok(())
        }
    }

    fn attribute(r: &Resource, key: &str) -> Option<String> {
        r.get(&Key::new(key.to_string())).map(|v| v.to_string())
    }

    #[test]
    fn the_instance_id_joins_the_resource_once_known() {
        let instance = InstanceId::default();
        let mut e = WithInstance::new(Discard, instance.clone());
        let base = Resource::builder_empty()
            .with_service_name("ringtrain-worker")
            .build();
        e.set_resource(&base);
        assert_eq!(
            attribute(&e.labelled("w-3"), SERVICE_INSTANCE_ID).as_deref(),
            Some("w-3")
        );
        assert_eq!(
            attribute(&e.labelled("w-3"), SERVICE_NAME).as_deref(),
            Some("ringtrain-worker")
        );
    }

    #[test]
    fn an_instance_id_from_the_environment_wins() {
        let mut e = WithInstance::new(Discard, InstanceId::default());
        let base = Resource::builder_empty()
            .with_attribute(KeyValue::new(SERVICE_INSTANCE_ID, "pod-7"))
            .build();
        e.set_resource(&base);
        assert_eq!(
            attribute(&e.labelled("w-3"), SERVICE_INSTANCE_ID).as_deref(),
            Some("pod-7")
        );
    }

    #[test]
    fn only_ringtrain_spans_by_name_and_its_warnings_are_exported() {
        // Metadata of real call sites, checked through the filter function itself.
        struct Seen(std::sync::Mutex<Vec<(String, bool)>>);
        impl tracing::Subscriber for Seen {
            fn register_callsite(
                &self,
                meta: &'static tracing::Metadata<'static>,
            ) -> tracing::subscriber::Interest {
                self.0
                    .lock()
                    .unwrap()
                    .push((meta.name().to_string(), exported(meta)));
                tracing::subscriber::Interest::always()
            }
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, _: &tracing::Event<'_>) {}
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let seen = std::sync::Arc::new(Seen(Default::default()));
        tracing::subscriber::with_default(seen.clone(), || {
            let _a = tracing::info_span!("step").entered();
            let _b = tracing::info_span!("assignment").entered();
            tracing::warn!("a warning");
            tracing::info!("an info line");
        });
        let seen = seen.0.lock().unwrap().clone();
        let verdict = |name: &str| seen.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        assert_eq!(verdict("step"), Some(true));
        assert_eq!(verdict("assignment"), Some(false));
        let events: Vec<bool> = seen
            .iter()
            .filter(|(n, _)| n.starts_with("event "))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(events, vec![true, false], "{seen:?}");
    }
}
