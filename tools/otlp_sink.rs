//! A minimal OTLP/gRPC trace receiver for benchmarks: accepts every export, counts the
//! spans by name, and on SIGTERM or ctrl-c prints the counts as one JSON object on
//! stdout. It stands in for Jaeger's collector, so a benchmark with tracing on pays the
//! real cost of exporting (encoding, gRPC, a receiver on the same cores).
//!
//! ```sh
//! cargo build --release --example otlp_sink
//! target/release/examples/otlp_sink [ADDR]   # prints "listening on 127.0.0.1:PORT"
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<BTreeMap<String, u64>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for rs in &request.get_ref().resource_spans {
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    *counts.entry(s.name.clone()).or_default() += 1;
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let sink = Sink::default();
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        r = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)) => r?,
        r = stop => r?,
    }
    let counts = sink.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let total: u64 = counts.values().sum();
    println!(
        "{}",
        serde_json::json!({ "spans": total, "by_name": counts })
    );
    Ok(())
}
