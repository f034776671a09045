//! gRPC adapters: convert requests, call [`Coordinator`], map results to `Status` through
//! [`to_status`]. No logic lives here.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use ringtrain_proto::v1::{
    job_service_server::JobService, worker_control_server::WorkerControl, AttachRequest,
    CheckpointAck, CheckpointPart, CheckpointRequest, ControlMessage, DataChunk, DataHeader,
    DataRef, JobRequest, JobStatus, ListRequest, ListResponse, ReportAck, ShardChunk, ShardRequest,
    SubmitRequest, SubmitResponse, WorkerReport,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use ringtrain_core::telemetry::{RemoteParent, TRACEPARENT, TRACESTATE};
use ringtrain_core::CheckpointError;

use crate::error::CoordinatorError;
use crate::service::Coordinator;
use crate::store::StoreError;
use crate::watch;

/// The one mapping from domain errors to gRPC status codes.
pub fn to_status(e: CoordinatorError) -> Status {
    let msg = e.to_string();
    match e {
        CoordinatorError::Spec(_) | CoordinatorError::Data { .. } | CoordinatorError::Table(_) => {
            Status::invalid_argument(msg)
        }
        CoordinatorError::UnknownJob(_) => Status::not_found(msg),
        CoordinatorError::BadRequest(_) => Status::invalid_argument(msg),
        CoordinatorError::Precondition(_) => Status::failed_precondition(msg),
        CoordinatorError::TooLarge(_) => Status::resource_exhausted(msg),
        CoordinatorError::Aborted(_) => Status::aborted(msg),
        CoordinatorError::Checkpoint(c) => match c {
            CheckpointError::Corrupt { .. } => Status::data_loss(msg),
            CheckpointError::Invalid(_) => Status::invalid_argument(msg),
            CheckpointError::Io { .. } | CheckpointError::Serialize(_) => Status::internal(msg),
        },
        CoordinatorError::Io { .. }
        | CoordinatorError::Serialize(_)
        | CoordinatorError::Transport(_) => Status::internal(msg),
        CoordinatorError::Store(s) => match s {
            StoreError::Fenced { .. } | StoreError::Unavailable { .. } => Status::unavailable(msg),
            StoreError::Corrupt { .. } => Status::data_loss(msg),
            StoreError::Config { .. } => Status::internal(msg),
        },
        CoordinatorError::LeaderLost => Status::unavailable(msg),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The W3C trace context a caller sent in the request's metadata (absent when none).
fn remote_parent(metadata: &tonic::metadata::MetadataMap) -> RemoteParent {
    let get = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok());
    RemoteParent::from_headers(get(TRACEPARENT), get(TRACESTATE))
}

/// Both services of the coordinator over one [`Coordinator`].
#[derive(Debug, Clone)]
pub struct CoordinatorApi {
    core: Arc<Coordinator>,
}

impl CoordinatorApi {
    /// Adapters over `core`.
    pub fn new(core: Arc<Coordinator>) -> Self {
        CoordinatorApi { core }
    }
}

#[tonic::async_trait]
impl JobService for CoordinatorApi {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        // The job's span continues the client's trace when the client sent one.
        let parent = remote_parent(request.metadata());
        let id = parent
            .scope(self.core.submit(request.into_inner()))
            .await
            .map_err(to_status)?;
        Ok(Response::new(SubmitResponse { job_id: id.0 }))
    }

    async fn get(&self, request: Request<JobRequest>) -> Result<Response<JobStatus>, Status> {
        self.core
            .get(&request.into_inner().job_id)
            .map(Response::new)
            .map_err(to_status)
    }

    type WatchStream = BoxStream<JobStatus>;

    async fn watch(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let rx = self
            .core
            .watch(&request.into_inner().job_id)
            .map_err(to_status)?;
        let stream = watch::coalesce(rx, watch::MIN_INTERVAL).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(&self, request: Request<JobRequest>) -> Result<Response<JobStatus>, Status> {
        self.core
            .cancel(&request.into_inner().job_id)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn list(&self, _request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(ListResponse {
            jobs: self.core.list(),
        }))
    }

    async fn has_data(&self, request: Request<DataHeader>) -> Result<Response<DataRef>, Status> {
        self.core
            .has_data(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn upload_data(
        &self,
        request: Request<Streaming<DataChunk>>,
    ) -> Result<Response<DataRef>, Status> {
        self.core
            .upload_data(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}

#[tonic::async_trait]
impl WorkerControl for CoordinatorApi {
    type AttachStream = BoxStream<ControlMessage>;

    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let r = request.into_inner();
        self.core.attach(r).map(Response::new).map_err(to_status)
    }

    type FetchShardStream = BoxStream<ShardChunk>;

    async fn fetch_shard(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<Self::FetchShardStream>, Status> {
        let chunks = self.core.shard(&request.into_inner()).map_err(to_status)?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn report(
        &self,
        request: Request<Streaming<WorkerReport>>,
    ) -> Result<Response<ReportAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(r) = stream.message().await? {
            self.core.report(r).await;
        }
        Ok(Response::new(ReportAck {}))
    }

    type FetchCheckpointStream = BoxStream<CheckpointPart>;

    async fn fetch_checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        let parts = self
            .core
            .checkpoint_parts(request.into_inner())
            .await
            .map_err(to_status)?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            parts.into_iter().map(Ok),
        ))))
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<CheckpointPart>>,
    ) -> Result<Response<CheckpointAck>, Status> {
        // The coordinator's `checkpoint` span is a child of the uploading worker's.
        let parent = remote_parent(request.metadata());
        let path = parent
            .scope(self.core.upload_checkpoint(request.into_inner()))
            .await
            .map_err(to_status)?;
        Ok(Response::new(CheckpointAck {
            path: path.display().to_string(),
        }))
    }
}
