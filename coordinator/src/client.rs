//! A thin client of the coordinator's job API, for the CLI.

use std::path::Path;
use std::time::Duration;

use ringtrain_proto::v1::{job_service_client::JobServiceClient, JobStatus, SubmitRequest};
use tonic::transport::Channel;

use crate::error::CoordinatorError;
use crate::job_file::JobFile;

/// The address used when neither `--coordinator` nor `RINGTRAIN_COORDINATOR` is given.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// Connects to a coordinator's job service.
pub async fn connect(url: &str) -> Result<JobServiceClient<Channel>, CoordinatorError> {
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| CoordinatorError::Transport(format!("bad coordinator address {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            CoordinatorError::Transport(format!(
                "cannot reach the coordinator at {url}: {e} (start one with `ringtrain serve`, or pass --coordinator)"
            ))
        })?;
    Ok(JobServiceClient::new(channel)
        .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES))
}

/// Reads a job file and checks it locally (so a typo fails before anything starts), then
/// builds the submit request with paths resolved against the file's directory.
pub fn submit_request(
    path: &Path,
    out_dir: Option<&Path>,
    workers: Option<u32>,
) -> Result<SubmitRequest, CoordinatorError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::Data {
        path: source.clone(),
        message: format!("cannot read the job file: {e}"),
    })?;
    let base = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    let base = std::fs::canonicalize(base).map_err(CoordinatorError::io(format!(
        "resolving {}",
        base.display()
    )))?;
    let mut file = JobFile::parse(&text, &source)?;
    if let Some(w) = workers {
        file.workers = ringtrain_core::job_file::Workers::Exactly(w);
    }
    file.validate(&source, &base)?;
    let out_dir = match out_dir {
        Some(p) => std::path::absolute(p)
            .map_err(CoordinatorError::io(format!("resolving {}", p.display())))?
            .display()
            .to_string(),
        None => String::new(),
    };
    Ok(SubmitRequest {
        spec_toml: text,
        base_dir: base.display().to_string(),
        source,
        out_dir,
        workers: workers.unwrap_or(0),
        max_steps: 0,
        resume_dir: String::new(),
    })
}

/// Whether a status is final.
pub fn is_terminal(s: &JobStatus) -> bool {
    matches!(s.state.as_str(), "completed" | "failed" | "cancelled")
}
