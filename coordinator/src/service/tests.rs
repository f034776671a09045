//! Tests of the coordinator shell: effects reach workers, reports drive the machine.

use super::*;
use futures::StreamExt;
use ringtrain_proto::v1::{
    checkpoint_part, worker_report, CheckpointData, CheckpointHeader, CheckpointPart, StepReport,
    WorkerReport,
};
use ringtrain_proto::v1::{AttachRequest, Shutdown};

fn step(job: &str, rank: u32, worker: &str, hash: u64) -> WorkerReport {
    WorkerReport {
        job_id: job.into(),
        generation: 1,
        rank,
        worker_id: worker.into(),
        kind: Some(worker_report::Kind::Step(StepReport {
            step: 1,
            param_hash: hash,
            ..StepReport::default()
        })),
    }
}

async fn running_job() -> (
    Arc<Coordinator>,
    String,
    Vec<ControlStream>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let core = Coordinator::new(ServerConfig {
        data_dir: dir.path().to_path_buf(),
        ..ServerConfig::default()
    });
    let id = core
        .submit(SubmitRequest {
            spec_toml: crate::test_jobs::tiny(2, 1),
            ..SubmitRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(core.get(&id.0).unwrap().state, "waiting");
    let streams = vec![
        core.register("a:1".into(), "a".into(), String::new(), String::new()),
        core.register("b:1".into(), "b".into(), String::new(), String::new()),
    ];
    assert_eq!(core.get(&id.0).unwrap().state, "running");
    for (rank, w) in ["w-1", "w-2"].into_iter().enumerate() {
        core.report(report(
            &id.0,
            rank as u32,
            w,
            worker_report::Kind::Resumed(ringtrain_proto::v1::Resumed {
                step: 0,
                param_hash: 1,
                source: "init".into(),
            }),
        ))
        .await;
    }
    (core, id.0, streams, dir)
}

/// Every message already queued on a control stream, without waiting; `None` at the
/// end means the stream itself has ended.
fn drain(rx: &mut ControlStream) -> (Vec<ControlMessage>, bool) {
    use futures::FutureExt;
    let mut out = Vec::new();
    loop {
        match rx.next().now_or_never() {
            Some(Some(Ok(m))) => out.push(m),
            Some(Some(Err(_))) => {}
            Some(None) => return (out, true),
            None => return (out, false),
        }
    }
}

fn report(job: &str, rank: u32, worker: &str, kind: worker_report::Kind) -> WorkerReport {
    WorkerReport {
        job_id: job.into(),
        generation: 1,
        rank,
        worker_id: worker.into(),
        kind: Some(kind),
    }
}

fn step_n(job: &str, rank: u32, worker: &str, step: u64, hash: u64) -> WorkerReport {
    report(
        job,
        rank,
        worker,
        worker_report::Kind::Step(StepReport {
            step,
            param_hash: hash,
            ..StepReport::default()
        }),
    )
}

fn finished(job: &str, rank: u32, worker: &str, steps: u64) -> WorkerReport {
    report(
        job,
        rank,
        worker,
        worker_report::Kind::Finished(ringtrain_proto::v1::Finished {
            steps,
            epochs: 1,
            ..Default::default()
        }),
    )
}

#[tokio::test]
async fn a_replica_hash_mismatch_fails_the_job_loudly() {
    let (core, id, mut streams, _dir) = running_job().await;
    core.report(step(&id, 0, "w-1", 0xaaaa)).await;
    core.report(step(&id, 1, "w-2", 0xbbbb)).await;
    let s = core.get(&id).unwrap();
    assert_eq!(s.state, "failed");
    assert!(
        s.error.contains("replicas diverged at step 1"),
        "{}",
        s.error
    );
    // Both workers were told to stop (after their registration and assignment).
    for rx in streams.iter_mut() {
        let (msgs, _) = drain(rx);
        assert!(msgs
            .iter()
            .any(|m| matches!(m.kind, Some(control_message::Kind::Cancel(_)))));
    }
}

#[tokio::test]
async fn agreeing_replicas_are_counted_and_strangers_ignored() {
    let (core, id, _streams, _dir) = running_job().await;
    core.report(step(&id, 0, "w-1", 7)).await;
    // A report from a worker that is not rank 1 of this job is ignored.
    core.report(step(&id, 1, "w-9", 8)).await;
    core.report(step(&id, 1, "w-2", 7)).await;
    let s = core.get(&id).unwrap();
    assert_eq!(s.state, "running");
    assert_eq!(s.verified_steps, 1);
}

#[tokio::test]
async fn a_worker_of_another_protocol_version_is_refused_naming_both() {
    let core = Coordinator::new(ServerConfig::default());
    let Err(e) = core.attach(AttachRequest {
        collective_addr: "a:1".into(),
        name: "old".into(),
        protocol_version: 1,
        ..AttachRequest::default()
    }) else {
        panic!("an old worker was accepted");
    };
    let status = crate::grpc::to_status(e);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("protocol version 1")
            && status
                .message()
                .contains(&format!("version {}", ringtrain_proto::PROTOCOL_VERSION)),
        "{}",
        status.message()
    );
    assert_eq!(core.worker_count(), 0);
}

#[tokio::test]
async fn a_lost_worker_sends_the_job_back_to_waiting_and_a_newcomer_starts_generation_2() {
    let (core, id, mut streams, _dir) = running_job().await;
    core.detach(&WorkerId("w-2".into()));
    let s = core.get(&id).unwrap();
    assert_eq!(s.state, "waiting", "{}", s.error);
    // The survivor was told to stop generation 1.
    let (msgs, _) = drain(&mut streams[0]);
    assert!(msgs.iter().any(|m| matches!(
        &m.kind,
        Some(control_message::Kind::Cancel(c)) if c.generation == 1
    )));
    let _c = core.register("c:1".into(), "c".into(), String::new(), String::new());
    let s = core.get(&id).unwrap();
    assert_eq!(s.state, "running");
    assert_eq!(s.generation, 2);
    // The survivor keeps rank 0; the newcomer takes rank 1.
    assert_eq!(s.worker_ids, ["w-1", "w-3"]);
    assert_eq!(s.workers, 2);
    let kinds: Vec<(&str, &str)> = s
        .events
        .iter()
        .map(|e| (e.kind.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("start", "job started"),
            ("lost", "worker w-2 (rank 1) lost")
        ]
    );
    let (msgs, _) = drain(&mut streams[0]);
    assert!(msgs.iter().any(|m| matches!(
        &m.kind,
        Some(control_message::Kind::Assignment(a)) if a.generation == 2 && a.rank == 0 && a.state_floor == 1
    )));
}

#[tokio::test]
async fn rank_0_finishing_first_does_not_complete_the_job_before_rank_1_is_verified() {
    let (core, id, _streams, _dir) = running_job().await;
    core.report(step_n(&id, 0, "w-1", 1, 5)).await;
    let header = CheckpointHeader {
        job_id: id.clone(),
        generation: 1,
        step: 1,
        epoch: 1,
        r#final: true,
        worker_id: "w-1".into(),
        buffers: vec!["params".into(), "opt.m".into(), "opt.v".into()],
        resume_json: "{\"epoch\":1,\"epoch_cursor\":0,\"rng_seed\":0,\"schedule_step\":1,\"early_stopping\":null,\"privacy_ledger\":null}".into(),
        ..CheckpointHeader::default()
    };
    let mut parts = vec![Ok(CheckpointPart {
        kind: Some(checkpoint_part::Kind::Header(header)),
    })];
    // 3 inputs x 2 units + 2 biases, for params and Adam's m and v, in two chunks each.
    for buffer in 0..3 {
        for _ in 0..2 {
            parts.push(Ok(CheckpointPart {
                kind: Some(checkpoint_part::Kind::Data(CheckpointData {
                    buffer,
                    data: vec![0u8; 16].into(),
                })),
            }));
        }
    }
    core.upload_checkpoint(futures::stream::iter(parts))
        .await
        .unwrap();
    core.report(finished(&id, 0, "w-1", 1)).await;
    // Rank 1's last step report has not arrived: not completed yet.
    assert_eq!(core.get(&id).unwrap().state, "running");
    core.report(step_n(&id, 1, "w-2", 1, 5)).await;
    assert_eq!(core.get(&id).unwrap().state, "running");
    core.report(finished(&id, 1, "w-2", 1)).await;
    let s = core.get(&id).unwrap();
    assert_eq!(s.state, "completed", "{}", s.error);
    assert_eq!(s.verified_steps, 1);
}

#[tokio::test]
async fn a_worker_whose_control_stream_is_full_is_dropped_not_skipped() {
    let (core, id, mut streams, _dir) = running_job().await;
    {
        let mut st = core.lock();
        // w-2 never reads its stream: it fills up.
        for _ in 0..CONTROL_CAPACITY + 1 {
            st.send_control(
                &WorkerId::from("w-2"),
                control_message::Kind::Shutdown(Shutdown {}),
            );
        }
        core.settle(&mut st);
    }
    let s = core.get(&id).unwrap();
    assert_eq!(s.state, "waiting");
    assert_eq!(
        core.lock()
            .jobs
            .values()
            .next()
            .map(|j| j.machine.snapshot().lost),
        Some(vec!["worker w-2 (rank 1, b:1) in generation 1".to_string()])
    );
    assert_eq!(core.worker_count(), 1);
    // Its attach stream ends, so the worker notices and reattaches.
    let (_, ended) = drain(&mut streams[1]);
    assert!(ended);
    let (_, ended) = drain(&mut streams[0]);
    assert!(!ended);
}
