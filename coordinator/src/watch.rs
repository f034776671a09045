//! What `JobService.Watch` sends: job status updates, coalesced.
//!
//! A job's status changes on every optimizer step (tens of thousands of times per run),
//! and it carries the whole epoch history. Sending each change with its history made a
//! seed job's watch over 20,000 messages and 16 MB or more. The contract here, which the
//! proto comment of `Watch` repeats for clients:
//!
//! - the first message is the full current status;
//! - a change of `state`, `epoch` or `generation`, and a grown `history`, is sent as soon
//!   as it is seen; other changes (step, metrics) are sent at most once per
//!   [`MIN_INTERVAL`], the latest one winning, and the latest is always sent eventually;
//! - `history` is set only in a message where it differs from the previous message's;
//!   otherwise it is empty, and the client keeps the last non-empty history it saw
//!   ([`HistoryKeeper`] does that for our CLI);
//! - the first terminal status (completed, failed, cancelled) is sent with its full
//!   history, and then the stream ends.
//!
//! [`Coalescer`] decides what to send, given the time: pure and tested directly.
//! [`coalesce`] drives it from a job's `watch::Receiver`.

use std::time::Duration;

use futures::Stream;
use ringtrain_proto::v1::{EpochSummary, JobStatus};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::is_terminal;

/// Least time between two messages that carry only step-level progress.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// What to do with one observed status.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send this message now (its `history` is empty unless the history changed).
    Send(Box<JobStatus>),
    /// Nothing new since the last message.
    Skip,
    /// Only step-level progress, and the last message went out too recently: offer the
    /// latest status again at this instant.
    HoldUntil(Instant),
}

/// Decides, for each status a watcher observes, whether and what to send.
#[derive(Debug, Clone)]
pub struct Coalescer {
    min_interval: Duration,
    /// The last status sent (with its full history) and when.
    last: Option<(JobStatus, Instant)>,
}

impl Coalescer {
    /// A coalescer that sends step-level progress at most once per `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        Coalescer {
            min_interval,
            last: None,
        }
    }

    /// Whether a terminal status has been sent: the stream is over.
    pub fn finished(&self) -> bool {
        self.last.as_ref().is_some_and(|(s, _)| is_terminal(s))
    }

    /// Offers the latest observed status at time `now`. It is borrowed, not taken: a
    /// watcher sees every step but clones only what it sends.
    pub fn offer(&mut self, status: &JobStatus, now: Instant) -> Decision {
        let Some((last, sent_at)) = &self.last else {
            return self.send(status, now, true);
        };
        if last == status {
            return Decision::Skip;
        }
        let history_changed = last.history != status.history;
        let prompt = is_terminal(status)
            || history_changed
            || last.state != status.state
            || last.epoch != status.epoch
            || last.generation != status.generation;
        let due = *sent_at + self.min_interval;
        if prompt || now >= due {
            // The terminal message is all a client that reads only the last one sees.
            let with_history = history_changed || is_terminal(status);
            self.send(status, now, with_history)
        } else {
            Decision::HoldUntil(due)
        }
    }

    fn send(&mut self, status: &JobStatus, now: Instant, with_history: bool) -> Decision {
        let mut msg = status.clone();
        if !with_history {
            msg.history.clear();
        }
        self.last = Some((status.clone(), now));
        Decision::Send(Box::new(msg))
    }
}

/// The coalesced stream of a job's status (see the module doc): it ends right after the
/// first terminal status, or when the job's status channel closes (the coordinator is
/// shutting down), after sending any update still held back.
pub fn coalesce(
    rx: watch::Receiver<JobStatus>,
    min_interval: Duration,
) -> impl Stream<Item = JobStatus> + Send + 'static {
    futures::stream::unfold(
        (rx, Coalescer::new(min_interval)),
        |(mut rx, mut coalescer)| async move {
            if coalescer.finished() {
                return None;
            }
            loop {
                // The borrow (a read lock on the job's status) ends with this statement,
                // before any await.
                let decision = coalescer.offer(&rx.borrow_and_update(), Instant::now());
                match decision {
                    Decision::Send(msg) => return Some((*msg, (rx, coalescer))),
                    Decision::Skip => {
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                    Decision::HoldUntil(due) => {
                        tokio::select! {
                            changed = rx.changed() => if changed.is_err() {
                                // Closed: nothing newer will come, so the held update
                                // goes out now.
                                let decision = coalescer.offer(&rx.borrow(), due);
                                return match decision {
                                    Decision::Send(msg) => Some((*msg, (rx, coalescer))),
                                    Decision::Skip | Decision::HoldUntil(_) => None,
                                };
                            },
                            _ = tokio::time::sleep_until(due) => {}
                        }
                    }
                }
            }
        },
    )
}

/// The client side of the history contract: fills a message's empty `history` with the
/// last non-empty one seen, so each status it returns is complete.
#[derive(Debug, Clone, Default)]
pub struct HistoryKeeper {
    history: Vec<EpochSummary>,
}

impl HistoryKeeper {
    /// Takes the next message of a watch and returns it with its history filled in.
    pub fn apply(&mut self, mut status: JobStatus) -> JobStatus {
        if status.history.is_empty() {
            status.history = self.history.clone();
        } else {
            self.history = status.history.clone();
        }
        status
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use futures::StreamExt;

    const MS: Duration = Duration::from_millis(1);

    fn summary(epoch: u32) -> EpochSummary {
        EpochSummary {
            epoch,
            loss: 1.0 / f64::from(epoch),
            ..Default::default()
        }
    }

    fn running(step: u64, epochs_done: u32) -> JobStatus {
        JobStatus {
            job_id: "j-1".into(),
            state: "running".into(),
            epochs: 10,
            epoch: epochs_done,
            step,
            total_steps: 10_000,
            generation: 1,
            history: (1..=epochs_done).map(summary).collect(),
            ..Default::default()
        }
    }

    fn with_state(mut s: JobStatus, state: &str) -> JobStatus {
        s.state = state.into();
        s
    }

    fn sent(d: Decision) -> Option<JobStatus> {
        match d {
            Decision::Send(m) => Some(*m),
            Decision::Skip | Decision::HoldUntil(_) => None,
        }
    }

    #[test]
    fn a_burst_of_1000_steps_in_one_second_gives_about_ten_messages() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(MIN_INTERVAL);
        let mut count = 0;
        for step in 1..=1000u64 {
            // One step every millisecond: the whole burst lasts just under a second.
            if sent(c.offer(&running(step, 0), t0 + MS * (step as u32 - 1))).is_some() {
                count += 1;
            }
        }
        // Sent at 0, 100, ..., 900 ms.
        assert_eq!(count, 10);
    }

    #[test]
    fn what_is_sent_when() {
        let t0 = Instant::now();
        struct Case {
            what: &'static str,
            previous: JobStatus,
            next: JobStatus,
            after: Duration,
            // None: held back or skipped.
            sent_history: Option<usize>,
        }
        let cases = [
            Case {
                what: "a step 1 ms later is held back",
                previous: running(10, 0),
                next: running(11, 0),
                after: MS,
                sent_history: None,
            },
            Case {
                what: "a step after the interval is sent, without history",
                previous: running(10, 2),
                next: running(11, 2),
                after: MIN_INTERVAL,
                sent_history: Some(0),
            },
            Case {
                what: "the same status again is skipped, however late",
                previous: running(10, 2),
                next: running(10, 2),
                after: Duration::from_secs(5),
                sent_history: None,
            },
            Case {
                what: "a state change is sent at once",
                previous: with_state(running(0, 0), "waiting"),
                next: running(0, 0),
                after: MS,
                sent_history: Some(0),
            },
            Case {
                what: "an epoch change is sent at once",
                previous: running(99, 0),
                next: JobStatus {
                    epoch: 1,
                    ..running(100, 0)
                },
                after: MS,
                sent_history: Some(0),
            },
            Case {
                what: "a new generation is sent at once",
                previous: running(99, 1),
                next: JobStatus {
                    generation: 2,
                    ..running(99, 1)
                },
                after: MS,
                sent_history: Some(0),
            },
            Case {
                what: "a grown history is sent at once, in full",
                previous: JobStatus {
                    epoch: 3,
                    ..running(300, 2)
                },
                next: running(300, 3),
                after: MS,
                sent_history: Some(3),
            },
            Case {
                what: "completion is sent at once with the full history",
                previous: running(1000, 10),
                next: with_state(running(1000, 10), "completed"),
                after: MS,
                sent_history: Some(10),
            },
            Case {
                what: "failure is sent at once with the full history",
                previous: running(500, 5),
                next: JobStatus {
                    error: "worker w-2 was lost".into(),
                    ..with_state(running(500, 5), "failed")
                },
                after: MS,
                sent_history: Some(5),
            },
            Case {
                what: "cancellation is sent at once with the full history",
                previous: running(500, 5),
                next: with_state(running(501, 5), "cancelled"),
                after: MS,
                sent_history: Some(5),
            },
        ];
        for case in cases {
            let mut c = Coalescer::new(MIN_INTERVAL);
            let first = sent(c.offer(&case.previous, t0)).expect("first is sent");
            assert_eq!(
                first, case.previous,
                "{}: the first message is full",
                case.what
            );
            let got = sent(c.offer(&case.next, t0 + case.after));
            assert_eq!(
                got.as_ref().map(|m| m.history.len()),
                case.sent_history,
                "{}",
                case.what
            );
            if let Some(m) = got {
                // Everything but the history is the status as observed.
                let mut expected = case.next.clone();
                expected.history.truncate(m.history.len());
                assert_eq!(m, expected, "{}", case.what);
            }
        }
    }

    #[test]
    fn a_held_step_is_offered_again_when_due_and_then_sent() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(MIN_INTERVAL);
        assert!(sent(c.offer(&running(1, 0), t0)).is_some());
        assert_eq!(
            c.offer(&running(2, 0), t0 + MS),
            Decision::HoldUntil(t0 + MIN_INTERVAL)
        );
        let m = sent(c.offer(&running(7, 0), t0 + MIN_INTERVAL)).expect("due");
        assert_eq!(m.step, 7);
    }

    #[test]
    fn history_is_sent_only_in_messages_where_it_grew() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(MIN_INTERVAL);
        let mut keeper = HistoryKeeper::default();
        let mut with_history = Vec::new();
        let mut t = t0;
        // Three epochs of 50 steps, one step every 10 ms, epoch summaries after each.
        for epoch in 0..3u32 {
            for i in 1..=50u64 {
                t += 10 * MS;
                let step = u64::from(epoch) * 50 + i;
                if let Some(m) = sent(c.offer(&running(step, epoch), t)) {
                    if !m.history.is_empty() {
                        with_history.push(m.history.len());
                    }
                    assert_eq!(keeper.apply(m).history.len(), epoch as usize);
                }
            }
            t += MS;
            let m = sent(c.offer(&running(u64::from(epoch + 1) * 50, epoch + 1), t))
                .expect("an epoch summary is sent at once");
            with_history.push(m.history.len());
            assert_eq!(keeper.apply(m).history, running(0, epoch + 1).history);
        }
        assert_eq!(with_history, [1, 2, 3]);
    }

    #[test]
    fn the_keeper_fills_an_empty_history_with_the_last_one_seen() {
        let mut k = HistoryKeeper::default();
        assert!(k.apply(running(1, 0)).history.is_empty());
        assert_eq!(k.apply(running(100, 2)).history.len(), 2);
        let mut bare = running(150, 2);
        bare.history.clear();
        assert_eq!(k.apply(bare).history, running(0, 2).history);
    }

    #[tokio::test]
    async fn the_stream_ends_right_after_the_terminal_status_while_the_job_lives_on() {
        let (tx, rx) = watch::channel(with_state(running(0, 0), "waiting"));
        let mut stream = Box::pin(coalesce(rx, MIN_INTERVAL));
        assert_eq!(stream.next().await.expect("first").state, "waiting");
        tx.send_replace(running(0, 0));
        assert_eq!(stream.next().await.expect("running").state, "running");
        for step in 1..=1000 {
            tx.send_replace(running(step, 0));
        }
        tx.send_replace(with_state(running(1000, 10), "completed"));
        let last = stream.next().await.expect("terminal");
        assert_eq!(last, with_state(running(1000, 10), "completed"));
        // `tx` is still alive: the stream must end by itself, not wait for a change.
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert_eq!(
            end,
            Ok(None),
            "the stream must end after the terminal status"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_watch_of_a_finished_job_is_one_full_message() {
        let done = with_state(running(1000, 10), "cancelled");
        let (tx, rx) = watch::channel(done.clone());
        let got: Vec<JobStatus> = coalesce(rx, MIN_INTERVAL).collect().await;
        assert_eq!(got, [done]);
        drop(tx);
    }

    #[tokio::test]
    async fn a_held_step_goes_out_when_due_without_another_change() {
        let (tx, rx) = watch::channel(running(1, 0));
        let interval = 20 * MS;
        let mut stream = Box::pin(coalesce(rx, interval));
        assert_eq!(stream.next().await.expect("first").step, 1);
        let sent_first = Instant::now();
        tx.send_replace(running(2, 0));
        // No further change: the held step must still arrive, once the interval is up.
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the held update is sent when due")
            .expect("stream still open");
        assert_eq!(next.step, 2);
        assert!(sent_first.elapsed() >= interval - MS);
    }

    #[tokio::test]
    async fn a_closed_channel_flushes_the_held_update_and_ends() {
        let (tx, rx) = watch::channel(running(1, 0));
        let mut stream = Box::pin(coalesce(rx, Duration::from_secs(3600)));
        assert_eq!(stream.next().await.expect("first").step, 1);
        tx.send_replace(running(2, 0));
        let stream_task = tokio::spawn(async move { stream.collect::<Vec<_>>().await });
        drop(tx);
        let rest = tokio::time::timeout(Duration::from_secs(5), stream_task)
            .await
            .expect("the stream ends when the channel closes")
            .expect("task");
        assert_eq!(rest.iter().map(|s| s.step).collect::<Vec<_>>(), [2]);
    }
}
