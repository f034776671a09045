//! gRPC adapter of the `Collective` service: forwards each incoming ring stream into the
//! [`CollectiveHub`]. No logic beyond the hand-over.

use std::sync::Arc;
use std::time::Duration;

use ringtrain_proto::v1::{collective_server::Collective, Phase, RingAck, RingChunk};
use tonic::{Request, Response, Status, Streaming};

use crate::collective::{CollectiveHub, Inbound};

/// How long a stream waits for a consumer that has stopped draining it.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// The `Collective` service of one worker process.
#[derive(Debug, Clone)]
pub struct CollectiveService {
    hub: Arc<CollectiveHub>,
}

impl CollectiveService {
    /// A service feeding `hub`.
    pub fn new(hub: Arc<CollectiveHub>) -> Self {
        CollectiveService { hub }
    }
}

#[tonic::async_trait]
impl Collective for CollectiveService {
    async fn ring(
        &self,
        request: Request<Streaming<RingChunk>>,
    ) -> Result<Response<RingAck>, Status> {
        let mut stream = request.into_inner();
        let hello = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("ring stream ended before its hello"))?;
        if hello.phase != Phase::Hello as i32 {
            return Err(Status::invalid_argument(
                "ring stream must start with a hello",
            ));
        }
        let tx = self
            .hub
            .sender(&hello.job_id, hello.generation)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "generation {} of job {} has already finished on this worker",
                    hello.generation, hello.job_id
                ))
            })?;
        let send = |m: Inbound| {
            let tx = tx.clone();
            async move { tx.send_timeout(m, FORWARD_TIMEOUT).await.is_ok() }
        };
        if !send(Inbound::Chunk(hello)).await {
            return Err(Status::cancelled("ring consumer is gone"));
        }
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if !send(Inbound::Chunk(chunk)).await {
                        return Err(Status::cancelled("ring consumer is gone"));
                    }
                }
                Ok(None) => return Ok(Response::new(RingAck {})),
                Err(status) => {
                    if !send(Inbound::Broken(status.to_string())).await {
                        tracing::debug!(%status, "ring stream broke after its consumer left");
                    }
                    return Err(status);
                }
            }
        }
    }
}
