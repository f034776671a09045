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

/// Builds the submit request for a job file and/or a run to continue.
///
/// A job file is read and checked locally (so a typo fails before anything starts), its
/// relative paths to resolve against its directory. Its dataset files are not uploaded
/// here: [`crate::upload::upload_datasets`] does that for a remote coordinator. `resume` names a run directory on
/// the coordinator's host to continue from its newest checkpoint that verifies; the job
/// file is then optional (without one, the coordinator uses the one saved in the run
/// directory, and with one, only `epochs` may differ from it). `out_dir` does not go
/// with `resume`: a resumed run writes on into its own directory.
pub fn submit_request(
    job: Option<&Path>,
    out_dir: Option<&Path>,
    workers: Option<u32>,
    resume: Option<&Path>,
) -> Result<SubmitRequest, CoordinatorError> {
    let resume_dir = match (resume, out_dir) {
        (Some(r), Some(o)) => {
            return Err(CoordinatorError::BadRequest(format!(
                "--out {} cannot be given with --resume {}: a resumed run writes on into its \
                 own directory (drop --out)",
                o.display(),
                r.display()
            )))
        }
        // Absolute here, where the user's working directory is known; the coordinator
        // (`ringtrain local`, or `submit` to one on this host) reads it as given.
        (Some(r), None) => std::path::absolute(r)
            .map_err(CoordinatorError::io(format!("resolving {}", r.display())))?
            .display()
            .to_string(),
        (None, _) => String::new(),
    };
    let Some(path) = job else {
        if resume_dir.is_empty() {
            return Err(CoordinatorError::BadRequest(
                "no job file: give JOB.toml, or --resume RUN_DIR to continue a run".into(),
            ));
        }
        return Ok(SubmitRequest {
            workers: workers.unwrap_or(0),
            resume_dir,
            ..SubmitRequest::default()
        });
    };
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
    // On this host only this host's files can be checked; `coordinator:` paths are
    // checked by the coordinator.
    file.validate(
        &source,
        &ringtrain_core::data_path::DataRoots::client(&base),
    )?;
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
        resume_dir,
        uploaded: Vec::new(),
    })
}

/// Whether a status is final.
pub fn is_terminal(s: &JobStatus) -> bool {
    matches!(s.state.as_str(), "completed" | "failed" | "cancelled")
}

/// A request carrying the current span's W3C trace context in its metadata
/// (`traceparent`, `tracestate`), so the coordinator's spans for it join the caller's
/// trace. Without an exported current span it is a plain request.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    ringtrain_proto::request_with_metadata(
        message,
        ringtrain_core::telemetry::context_of(&tracing::Span::current()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_without_a_job_file_sends_the_absolute_run_dir_only() {
        let req = submit_request(None, None, Some(3), Some(Path::new("runs/t-j-1"))).unwrap();
        let expected = std::env::current_dir().unwrap().join("runs/t-j-1");
        assert_eq!(req.resume_dir, expected.display().to_string());
        assert_eq!(req.workers, 3);
        assert!(
            req.spec_toml.is_empty() && req.out_dir.is_empty(),
            "{req:?}"
        );
    }

    #[test]
    fn a_resume_with_a_job_file_sends_both() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job.toml");
        std::fs::write(&job, crate::test_jobs::tiny(2, 4)).unwrap();
        let run = dir.path().join("runs/t-j-1");
        let req = submit_request(Some(&job), None, None, Some(&run)).unwrap();
        assert_eq!(req.resume_dir, run.display().to_string());
        assert_eq!(req.spec_toml, crate::test_jobs::tiny(2, 4));
        assert_eq!(req.source, job.display().to_string());
    }

    #[test]
    fn out_with_resume_and_neither_job_nor_resume_are_refused() {
        let e = submit_request(None, Some(Path::new("o")), None, Some(Path::new("r")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out o cannot be given with --resume r"), "{e}");
        let e = submit_request(None, None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("give JOB.toml, or --resume RUN_DIR"), "{e}");
    }
}
