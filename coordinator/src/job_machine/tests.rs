//! Table-driven tests of the job state machine: every row starts a fresh 2-worker job,
//! replays a history of events, applies one more, and checks the state it ends in and
//! the effects that last event returned.

use super::*;

fn w(n: u32) -> WorkerId {
    WorkerId(format!("w-{n}"))
}

fn avail(ns: &[u32]) -> Event {
    Event::WorkersAvailable {
        idle: ns.iter().map(|&n| w(n)).collect(),
    }
}

fn step(rank: u32, s: u64, hash: u64) -> Event {
    Event::StepReported {
        rank: Rank(rank),
        step: Step(s),
        param_hash: hash,
    }
}

fn finished(rank: u32, s: u64) -> Event {
    Event::RankFinished {
        rank: Rank(rank),
        steps: Step(s),
    }
}

fn stored(s: u64) -> Event {
    Event::CheckpointStored {
        step: Step(s),
        final_: true,
    }
}

fn lost(n: u32) -> Event {
    Event::WorkerLost {
        worker: w(n),
        detail: "127.0.0.1:9".into(),
    }
}

fn assign(g: u64, ns: &[u32], from: u64) -> Effect {
    Effect::SendAssignment {
        generation: Generation(g),
        members: ns.iter().map(|&n| w(n)).collect(),
        resume_from: Step(from),
        state_floor: Generation(1),
        checkpoint: None,
    }
}

fn cancel_gen(g: u64, ns: &[u32], reason: &str) -> Effect {
    Effect::CancelGeneration {
        generation: Generation(g),
        workers: ns.iter().map(|&n| w(n)).collect(),
        reason: reason.into(),
    }
}

fn failed(msg: &str) -> Effect {
    Effect::EndJob {
        state: JobState::Failed,
        error: Some(msg.into()),
    }
}

fn resumed(rank: u32, s: u64, hash: u64, fresh: bool) -> Event {
    Event::Resumed {
        rank: Rank(rank),
        step: Step(s),
        param_hash: hash,
        fresh,
    }
}

/// Two steps on both ranks, agreeing, then both ranks' end and the final checkpoint.
fn trained_two_steps() -> Vec<Event> {
    vec![
        avail(&[1, 2]),
        resumed(0, 0, 1, true),
        resumed(1, 0, 1, true),
        step(0, 1, 7),
        step(1, 1, 7),
        step(0, 2, 8),
        step(1, 2, 8),
    ]
}

fn with(mut base: Vec<Event>, more: &[Event]) -> Vec<Event> {
    base.extend_from_slice(more);
    base
}

struct Row {
    name: &'static str,
    policy: LossPolicy,
    history: Vec<Event>,
    event: Event,
    state: JobState,
    effects: Vec<Effect>,
}

fn row(
    name: &'static str,
    history: Vec<Event>,
    event: Event,
    state: JobState,
    effects: Vec<Effect>,
) -> Row {
    Row {
        name,
        policy: LossPolicy::Fail,
        history,
        event,
        state,
        effects,
    }
}

fn rows() -> Vec<Row> {
    use JobState::*;
    let completed = vec![
        Effect::Release {
            workers: vec![w(1), w(2)],
        },
        Effect::EndJob {
            state: Completed,
            error: None,
        },
    ];
    vec![
        row("too few workers: submitted -> waiting", vec![], avail(&[1]), Waiting, vec![]),
        row("no workers at all: submitted -> waiting", vec![], avail(&[]), Waiting, vec![]),
        row(
            "enough workers: submitted -> running, generation 1",
            vec![],
            avail(&[1, 2, 3]),
            Running,
            vec![assign(1, &[1, 2], 0)],
        ),
        row(
            "waiting -> running once enough arrive",
            vec![avail(&[1])],
            avail(&[1, 2]),
            Running,
            vec![assign(1, &[1, 2], 0)],
        ),
        row(
            "a running job ignores more availability",
            vec![avail(&[1, 2])],
            avail(&[3, 4]),
            Running,
            vec![],
        ),
        row(
            "a joiner does not change a running generation",
            vec![avail(&[1, 2])],
            Event::WorkerJoined { worker: w(3) },
            Running,
            vec![],
        ),
        row(
            "cancel while submitted",
            vec![],
            Event::Cancel,
            Cancelled,
            vec![Effect::EndJob {
                state: Cancelled,
                error: None,
            }],
        ),
        row(
            "cancel while waiting",
            vec![avail(&[1])],
            Event::Cancel,
            Cancelled,
            vec![Effect::EndJob {
                state: Cancelled,
                error: None,
            }],
        ),
        row(
            "cancel while running tells the members",
            vec![avail(&[1, 2])],
            Event::Cancel,
            Cancelled,
            vec![
                cancel_gen(1, &[1, 2], "cancelled"),
                Effect::EndJob {
                    state: Cancelled,
                    error: None,
                },
            ],
        ),
        row(
            "agreeing replicas keep it running",
            vec![avail(&[1, 2]), step(0, 1, 7)],
            step(1, 1, 7),
            Running,
            vec![],
        ),
        row(
            "a step 0 report is ignored",
            vec![avail(&[1, 2])],
            step(0, 0, 1),
            Running,
            vec![],
        ),
        row(
            "diverging replicas fail the job",
            vec![avail(&[1, 2]), step(0, 1, 0xaaaa)],
            step(1, 1, 0xbbbb),
            Failed,
            vec![
                cancel_gen(1, &[1, 2], "failed"),
                failed("replicas diverged at step 1: rank 0 has parameter hash 000000000000aaaa, rank 1 has 000000000000bbbb"),
            ],
        ),
        row(
            "a lost member fails the job, naming worker and rank (policy Fail)",
            vec![avail(&[1, 2])],
            lost(2),
            Failed,
            vec![
                cancel_gen(1, &[1], "failed"),
                failed("worker w-2 (rank 1, 127.0.0.1:9) was lost in generation 1"),
            ],
        ),
        row(
            "losing a worker that is not a member changes nothing",
            vec![avail(&[1, 2])],
            lost(3),
            Running,
            vec![],
        ),
        row(
            "losing a worker while waiting changes nothing",
            vec![avail(&[1])],
            lost(1),
            Waiting,
            vec![],
        ),
        Row {
            name: "a lost member ends the generation and the job waits (policy NewGeneration)",
            policy: LossPolicy::NewGeneration,
            history: trained_two_steps(),
            event: lost(1),
            state: Waiting,
            effects: vec![
                cancel_gen(
                    1,
                    &[2],
                    "worker w-1 (rank 0, 127.0.0.1:9) was lost in generation 1",
                ),
                Effect::Expel { worker: w(1) },
                Effect::WaitDeadline { token: 1 },
            ],
        },
        Row {
            name: "generation bump: the same job continues in generation 2 from step 2",
            policy: LossPolicy::NewGeneration,
            history: with(trained_two_steps(), &[lost(1)]),
            event: avail(&[2, 3]),
            state: Running,
            effects: vec![assign(2, &[2, 3], 2)],
        },
        Row {
            name: "generation 2 completes after its own steps are verified",
            policy: LossPolicy::NewGeneration,
            history: with(
                trained_two_steps(),
                &[
                    lost(1),
                    avail(&[2, 3]),
                    resumed(0, 2, 8, false),
                    resumed(1, 2, 8, false),
                    step(0, 3, 9),
                    step(1, 3, 9),
                    stored(3),
                    finished(0, 3),
                ],
            ),
            event: finished(1, 3),
            state: Completed,
            effects: vec![
                Effect::Release {
                    workers: vec![w(2), w(3)],
                },
                Effect::EndJob {
                    state: Completed,
                    error: None,
                },
            ],
        },
        Row {
            name: "a ring failure naming a lost peer starts a new generation (policy NewGeneration)",
            policy: LossPolicy::NewGeneration,
            history: vec![avail(&[1, 2])],
            event: Event::Failure {
                rank: Rank(0),
                worker: w(1),
                message: "no ring chunk within 20s".into(),
                lost_rank: Some(Rank(1)),
                lost_detail: "127.0.0.1:9".into(),
                confirmed: true,
            },
            state: Waiting,
            effects: vec![
                cancel_gen(
                    1,
                    &[1],
                    "worker w-2 (rank 1, 127.0.0.1:9) was lost in generation 1: rank 0 reports: no ring chunk within 20s",
                ),
                Effect::Expel { worker: w(2) },
                Effect::WaitDeadline { token: 1 },
            ],
        },
        row(
            "a ring failure naming a lost peer fails the job (policy Fail)",
            vec![avail(&[1, 2])],
            Event::Failure {
                rank: Rank(0),
                worker: w(1),
                message: "early eof".into(),
                lost_rank: Some(Rank(1)),
                lost_detail: "127.0.0.1:9".into(),
                confirmed: true,
            },
            Failed,
            vec![
                cancel_gen(1, &[1], "failed"),
                failed("worker w-2 (rank 1, 127.0.0.1:9) was lost in generation 1: rank 0 reports: early eof"),
            ],
        ),
        row(
            "an unconfirmed loss report (the named peer is still attached) is looked at again later",
            vec![avail(&[1, 2])],
            Event::Failure {
                rank: Rank(0),
                worker: w(1),
                message: "early eof".into(),
                lost_rank: Some(Rank(1)),
                lost_detail: "127.0.0.1:9".into(),
                confirmed: false,
            },
            Running,
            vec![Effect::ConfirmLater {
                event: Box::new(Event::Failure {
                    rank: Rank(0),
                    worker: w(1),
                    message: "early eof".into(),
                    lost_rank: Some(Rank(1)),
                    lost_detail: "127.0.0.1:9".into(),
                    confirmed: true,
                }),
            }],
        ),
        row(
            "a rank's own failure fails the job",
            vec![avail(&[1, 2])],
            Event::Failure {
                rank: Rank(1),
                worker: w(2),
                message: "label 12 is out of range".into(),
                lost_rank: None,
                lost_detail: String::new(),
                confirmed: false,
            },
            Failed,
            vec![
                cancel_gen(1, &[1, 2], "failed"),
                failed("rank 1 (worker w-2) failed in generation 1: label 12 is out of range"),
            ],
        ),
        row(
            "a checkpoint upload is written while running",
            vec![avail(&[1, 2])],
            Event::CheckpointUploaded {
                step: Step(5),
                final_: false,
            },
            Running,
            vec![Effect::WriteCheckpoint {
                step: Step(5),
                final_: false,
            }],
        ),
        row(
            "rank 0's end alone does not complete the job",
            with(trained_two_steps(), &[stored(2)]),
            finished(0, 2),
            Running,
            vec![],
        ),
        row(
            "rank 0 finishing first, before rank 1's last step report, waits for it",
            vec![
                avail(&[1, 2]),
                resumed(0, 0, 1, true),
                resumed(1, 0, 1, true),
                step(0, 1, 7),
                step(1, 1, 7),
                step(0, 2, 8),
                stored(2),
                finished(0, 2),
            ],
            step(1, 2, 8),
            Running,
            vec![],
        ),
        row(
            "every rank finished, every step verified, final checkpoint stored: completed",
            with(trained_two_steps(), &[stored(2), finished(0, 2)]),
            finished(1, 2),
            Completed,
            completed.clone(),
        ),
        row(
            "rank 1 may finish before the final checkpoint is stored",
            with(trained_two_steps(), &[finished(1, 2)]),
            stored(2),
            Running,
            vec![],
        ),
        row(
            "then rank 0's end completes the job",
            with(trained_two_steps(), &[finished(1, 2), stored(2)]),
            finished(0, 2),
            Completed,
            completed.clone(),
        ),
        row(
            "every rank finished but a step was never verified: failed",
            vec![
                avail(&[1, 2]),
                resumed(0, 0, 1, true),
                resumed(1, 0, 1, true),
                step(0, 1, 7),
                step(1, 1, 7),
                step(0, 2, 8),
                stored(2),
                finished(0, 2),
            ],
            finished(1, 2),
            Failed,
            vec![cancel_gen(1, &[1, 2], "failed"), failed(
                "every rank finished after step 2, but only 1 of the generation's 2 steps were verified across replicas",
            )],
        ),
        row(
            "ranks finishing after different step counts: failed",
            with(trained_two_steps(), &[stored(2), finished(0, 2)]),
            finished(1, 1),
            Failed,
            vec![cancel_gen(1, &[1, 2], "failed"), failed(
                "ranks finished after different step counts: rank 0 after 2, rank 1 after 1",
            )],
        ),
        row(
            "finishing without the final checkpoint: failed",
            with(trained_two_steps(), &[finished(0, 2)]),
            finished(1, 2),
            Failed,
            vec![cancel_gen(1, &[1, 2], "failed"), failed("rank 0 finished without uploading the final checkpoint")],
        ),
        row(
            "a fault while running fails the job",
            vec![avail(&[1, 2])],
            Event::Fault {
                message: "cannot deliver the assignment".into(),
            },
            Failed,
            vec![
                cancel_gen(1, &[1, 2], "failed"),
                failed("cannot deliver the assignment"),
            ],
        ),
        row(
            "a completed job ignores everything",
            with(
                trained_two_steps(),
                &[stored(2), finished(0, 2), finished(1, 2)],
            ),
            Event::Cancel,
            Completed,
            vec![],
        ),
        row(
            "a failed job ignores everything",
            vec![avail(&[1, 2]), lost(1)],
            avail(&[3, 4]),
            Failed,
            vec![],
        ),
        row(
            "a cancelled job ignores a late step",
            vec![avail(&[1, 2]), Event::Cancel],
            step(0, 1, 1),
            Cancelled,
            vec![],
        ),
    ]
}

#[test]
fn every_transition() {
    for r in rows() {
        let mut m = JobMachine::new(2, r.policy);
        for e in r.history {
            m.handle(e);
        }
        let effects = m.handle(r.event);
        assert_eq!(m.state(), r.state, "{}: state", r.name);
        assert_eq!(effects, r.effects, "{}: effects", r.name);
    }
}

#[test]
fn membership_is_checked_by_generation_rank_and_worker() {
    let mut m = JobMachine::new(2, LossPolicy::NewGeneration);
    assert!(m
        .check_member(Generation(1), Rank(0), &w(1))
        .unwrap_err()
        .message
        .contains("submitted"));
    m.handle(avail(&[1, 2]));
    assert!(m.check_member(Generation(1), Rank(0), &w(1)).is_ok());
    assert!(m.check_member(Generation(1), Rank(1), &w(1)).is_err());
    assert!(m.check_member(Generation(2), Rank(0), &w(1)).is_err());
    m.handle(lost(2));
    m.handle(avail(&[1, 3]));
    assert_eq!(m.generation(), Generation(2));
    // A straggler of generation 1 is no longer a member.
    assert!(m.check_member(Generation(1), Rank(0), &w(1)).is_err());
    assert!(m.check_member(Generation(2), Rank(1), &w(3)).is_ok());
}

#[test]
fn terminal_states_are_terminal() {
    for s in [JobState::Completed, JobState::Failed, JobState::Cancelled] {
        assert!(s.is_terminal());
    }
    for s in [JobState::Submitted, JobState::Waiting, JobState::Running] {
        assert!(!s.is_terminal());
    }
}

#[test]
fn replica_check_counts_agreement_and_reports_divergence() {
    let mut c = ReplicaCheck::new(3);
    for r in 0..3 {
        c.record(1, r, 42).unwrap();
    }
    c.record(2, 0, 7).unwrap();
    assert_eq!(c.verified(), 1);
    assert_eq!(c.pending(), 1);
    let d = c.record(2, 2, 8).unwrap_err();
    assert_eq!(d.first, (0, 7));
    assert_eq!(d.other, (2, 8));
    assert!(d.to_string().contains("step 2"));
}

fn stopped(rank: u32, s: u64, hash: u64, leaving: bool) -> Event {
    Event::Stopped {
        rank: Rank(rank),
        step: Step(s),
        param_hash: hash,
        leaving,
    }
}

fn elastic(min: usize, max: usize) -> JobMachine {
    JobMachine::with_config(MachineConfig {
        min,
        max,
        max_restarts: 2,
        ..MachineConfig::fixed(min)
    })
}

fn kinds(m: &JobMachine) -> Vec<(StartKind, u64, u32)> {
    m.events()
        .iter()
        .map(|e| (e.kind, e.step.0, e.workers))
        .collect()
}

#[test]
fn an_elastic_job_starts_with_its_minimum_and_drains_to_take_joiners() {
    let mut m = elastic(2, 4);
    assert_eq!(m.handle(avail(&[1])), vec![]);
    assert_eq!(m.state(), JobState::Waiting);
    let fx = m.handle(avail(&[1, 2]));
    assert!(matches!(&fx[..], [Effect::SendAssignment { members, .. }] if members.len() == 2));
    // Before the ranks agreed on their start, a joiner waits.
    assert_eq!(m.handle(avail(&[3])), vec![]);
    m.handle(resumed(0, 0, 1, true));
    m.handle(resumed(1, 0, 1, true));
    m.handle(step(0, 1, 7));
    m.handle(step(1, 1, 7));
    let fx = m.handle(avail(&[3, 4]));
    assert_eq!(
        fx,
        vec![Effect::DrainGeneration {
            generation: Generation(1),
            workers: vec![w(1), w(2)],
            reason: "workers w-3, w-4 joined".into(),
        }]
    );
    // A second offer while draining does nothing.
    assert_eq!(m.handle(avail(&[3, 4])), vec![]);
    m.handle(stopped(0, 2, 8, false));
    assert_eq!(m.state(), JobState::Running);
    let fx = m.handle(stopped(1, 2, 8, false));
    assert_eq!(
        fx,
        vec![
            Effect::Release {
                workers: vec![w(1), w(2)]
            },
            Effect::WaitDeadline { token: 1 }
        ]
    );
    assert_eq!(m.state(), JobState::Waiting);
    // The survivors come first, in their old rank order, whatever order they are offered in.
    let fx = m.handle(avail(&[4, 2, 3, 1]));
    assert_eq!(
        fx,
        vec![Effect::SendAssignment {
            generation: Generation(2),
            members: vec![w(1), w(2), w(4), w(3)],
            resume_from: Step(2),
            state_floor: Generation(1),
            checkpoint: None,
        }]
    );
    assert_eq!(
        kinds(&m),
        [(StartKind::Start, 0, 2), (StartKind::Joined, 2, 4)]
    );
    assert_eq!(m.verified_steps(), 1);
}

#[test]
fn a_leaving_member_is_not_taken_again_and_its_detach_is_no_loss() {
    let mut m = elastic(2, 3);
    m.handle(avail(&[1, 2, 3]));
    for r in 0..3 {
        m.handle(resumed(r, 0, 1, true));
    }
    for r in 0..3 {
        m.handle(step(r, 1, 7));
    }
    m.handle(stopped(1, 1, 7, true));
    // The leaving worker's detach arrives before the others' stop reports.
    assert_eq!(m.handle(lost(2)), vec![]);
    m.handle(stopped(0, 1, 7, false));
    m.handle(stopped(2, 1, 7, false));
    assert_eq!(m.state(), JobState::Waiting);
    let fx = m.handle(avail(&[1, 2, 3]));
    assert!(
        matches!(&fx[..], [Effect::SendAssignment { members, resume_from: Step(1), .. }] if *members == vec![w(1), w(3)])
    );
    assert_eq!(m.events()[1].reason, "worker w-2 (rank 1) left");
    assert_eq!(m.events()[1].kind, StartKind::Left);
    // No step goes backwards: the job continues from the step every rank stopped after.
    assert_eq!(m.events()[1].step, Step(1));
}

#[test]
fn verified_steps_count_a_redone_step_once() {
    let mut m = elastic(2, 2);
    m.handle(avail(&[1, 2]));
    m.handle(resumed(0, 0, 1, true));
    m.handle(resumed(1, 0, 1, true));
    for s in 1..=3 {
        m.handle(step(0, s, s));
        m.handle(step(1, s, s));
    }
    // Rank 0 reported step 4, then rank 1 died mid-way.
    m.handle(step(0, 4, 4));
    m.handle(lost(2));
    assert_eq!(m.verified_steps(), 3);
    m.handle(avail(&[1, 3]));
    // The survivor held step 4; the new generation starts there and the step counts once.
    m.handle(resumed(0, 4, 4, false));
    m.handle(resumed(1, 4, 4, false));
    assert_eq!(m.verified_steps(), 4);
    m.handle(step(0, 5, 5));
    m.handle(step(1, 5, 5));
    assert_eq!(m.verified_steps(), 5);
    // Falling back to an older checkpoint never lowers the count.
    m.handle(lost(3));
    m.handle(avail(&[1, 4]));
    m.handle(resumed(0, 2, 2, true));
    m.handle(resumed(1, 2, 2, true));
    assert_eq!(m.verified_steps(), 5);
    m.handle(step(0, 3, 3));
    m.handle(step(1, 3, 3));
    assert_eq!(m.verified_steps(), 5);
    // A fresh start raises the floor: state kept from before generation 3 no longer counts.
    assert_eq!(m.snapshot().state_floor, Generation(3));
}

#[test]
fn a_job_below_its_minimum_fails_after_the_wait_naming_every_lost_worker() {
    let mut m = elastic(2, 2);
    m.handle(avail(&[1, 2]));
    m.handle(lost(2));
    assert_eq!(m.state(), JobState::Waiting);
    // An old deadline does nothing.
    assert_eq!(m.handle(Event::WaitExpired { token: 0 }), vec![]);
    let fx = m.handle(Event::WaitExpired { token: 1 });
    assert_eq!(
        fx,
        vec![failed(
            "fewer than 2 workers for max_wait_secs after generation 1; lost workers: worker w-2 (rank 1, 127.0.0.1:9) in generation 1"
        )]
    );
}

#[test]
fn max_restarts_ends_a_job_that_keeps_losing_workers() {
    let mut m = elastic(2, 2);
    m.handle(avail(&[1, 2]));
    m.handle(lost(2));
    m.handle(avail(&[1, 3]));
    m.handle(lost(3));
    m.handle(avail(&[1, 4]));
    m.handle(lost(4));
    assert_eq!(m.state(), JobState::Waiting);
    let fx = m.handle(avail(&[1, 5]));
    assert_eq!(
        fx,
        vec![failed("the job lost workers more often than max_restarts = 2 allows: worker w-2 (rank 1, 127.0.0.1:9) in generation 1; worker w-3 (rank 1, 127.0.0.1:9) in generation 2; worker w-4 (rank 1, 127.0.0.1:9) in generation 3")]
    );
}

#[test]
fn a_restored_job_waits_and_restarts_from_its_snapshot() {
    let mut m = elastic(2, 2);
    m.handle(avail(&[1, 2]));
    m.handle(resumed(0, 0, 1, true));
    m.handle(resumed(1, 0, 1, true));
    m.handle(step(0, 1, 1));
    m.handle(step(1, 1, 1));
    let snap = m.snapshot();
    let mut r = JobMachine::restore(MachineConfig::fixed(2), snap);
    assert_eq!(r.state(), JobState::Waiting);
    let fx = r.handle(avail(&[7, 8]));
    assert!(matches!(
        &fx[..],
        [Effect::SendAssignment {
            generation: Generation(2),
            resume_from: Step(1),
            ..
        }]
    ));
    assert_eq!(
        r.events().last().map(|e| e.kind),
        Some(StartKind::Restarted)
    );
}
