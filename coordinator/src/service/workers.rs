//! Workers coming and going: attach (with its control stream), detach, and the
//! coordinator giving up on one.

use std::sync::Arc;

use futures::StreamExt;
use ringtrain_core::WorkerId;
use ringtrain_proto::v1::{control_message, AttachRequest, Registered, Shutdown};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{parse_num, restore, ControlStream, Coordinator, State, WorkerEntry, CONTROL_CAPACITY};
use crate::error::CoordinatorError;
use crate::job_machine::Event;

impl Coordinator {
    /// Registers a worker; the returned stream carries its control messages. When the
    /// worker goes away (the stream is dropped), it is detached. A worker of another
    /// protocol version is refused, naming both versions.
    pub fn attach(self: &Arc<Self>, req: AttachRequest) -> Result<ControlStream, CoordinatorError> {
        if req.collective_addr.is_empty() {
            return Err(CoordinatorError::BadRequest(
                "attach: collective_addr is empty".into(),
            ));
        }
        if req.protocol_version != ringtrain_proto::PROTOCOL_VERSION {
            return Err(CoordinatorError::Precondition(format!(
                "attach: worker {:?} speaks protocol version {}, this coordinator speaks version {}; run the same ringtrain release on both",
                req.name,
                req.protocol_version,
                ringtrain_proto::PROTOCOL_VERSION
            )));
        }
        Ok(self.register(req.collective_addr, req.name, req.data_addr, req.data_local))
    }

    pub(super) fn register(
        self: &Arc<Self>,
        addr: String,
        name: String,
        data_addr: String,
        data_local: String,
    ) -> ControlStream {
        let (tx, rx) = mpsc::channel(CONTROL_CAPACITY);
        let kick = CancellationToken::new();
        let mut st = self.lock();
        st.next_worker += 1;
        let n = st.next_worker;
        let id = WorkerId(format!("w-{n}"));
        info!(worker = %id, addr = %addr, name = %name, "worker attached");
        self.store_write(restore::StoreOp::PutWorker {
            id: id.0.clone(),
            json: serde_json::json!({ "addr": addr, "name": name }).to_string(),
        });
        let watcher = tx.clone();
        st.workers.insert(
            n,
            (
                id.clone(),
                WorkerEntry {
                    addr,
                    data_addr,
                    data_local,
                    name,
                    tx,
                    kick: kick.clone(),
                    job: None,
                },
            ),
        );
        // The first message on a fresh channel always fits.
        st.send_control(
            &id,
            control_message::Kind::Registered(Registered {
                worker_id: id.0.clone(),
                protocol_version: ringtrain_proto::PROTOCOL_VERSION,
            }),
        );
        for n in st.jobs.keys().copied().collect::<Vec<_>>() {
            self.apply(&mut st, n, Event::WorkerJoined { worker: id.clone() });
        }
        self.settle(&mut st);
        drop(st);
        let me = Arc::clone(self);
        self.tasks.spawn(async move {
            watcher.closed().await;
            me.detach(&id);
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).take_until(kick.cancelled_owned()))
    }

    /// Forgets a worker; a job it was running learns it lost a member.
    pub fn detach(&self, id: &WorkerId) {
        let mut st = self.lock();
        self.forget_worker(&mut st, id);
        self.settle(&mut st);
    }

    pub(super) fn forget_worker(&self, st: &mut State, id: &WorkerId) {
        let Some(n) = parse_num(&id.0, "w-") else {
            return;
        };
        let Some((_, w)) = st.workers.remove(&n) else {
            return;
        };
        // Ends the attach stream, if it is still open (an unreachable worker).
        w.kick.cancel();
        self.store_write(restore::StoreOp::DropWorker { id: id.0.clone() });
        match w.job {
            None => info!(worker = %id, addr = %w.addr, name = %w.name, "worker detached"),
            Some(job_id) => {
                warn!(worker = %id, addr = %w.addr, name = %w.name, job = %job_id, "worker lost while running a job");
                if let Ok(job) = st.job_number(&job_id.0) {
                    self.apply(
                        st,
                        job,
                        Event::WorkerLost {
                            worker: id.clone(),
                            detail: w.addr.clone(),
                        },
                    );
                }
            }
        }
    }

    /// Tells every attached worker to exit (used by `ringtrain local` on the way out).
    pub fn shutdown_workers(&self) {
        let mut st = self.lock();
        let ids: Vec<WorkerId> = st.workers.values().map(|(id, _)| id.clone()).collect();
        for id in ids {
            st.send_control(&id, control_message::Kind::Shutdown(Shutdown {}));
        }
        st.unreachable.clear();
    }

    /// Number of attached workers.
    pub fn worker_count(&self) -> usize {
        self.lock().workers.len()
    }
}
