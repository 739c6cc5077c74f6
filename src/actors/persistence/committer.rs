//! Committer: groups writes (group commit) in front of the persistence actor's writers.
//!
//! Every message is handed to [`Committer::append`] (by the SessionManager, or by a socket
//! through [`Writes`](crate::actors::session_manager::Writes)), which routes each conversation
//! to one lane (so one conversation is never written by two transactions at once,
//! which keeps `seq` gap-free and ordered). A lane is a queue that its writer drains itself:
//! while a transaction runs new messages queue, and when it ends the writer takes them all into
//! the next one at once, with no other thread in between. Under load batches grow, so
//! throughput grows with load. Outcomes go from the writer to the SessionManager in one
//! `Committed` per batch, in order, after the commit. Neither the next batch nor the outcomes
//! wait for the SessionManager's thread.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::{Db, Persistence};
use crate::actors::session_manager::messages::{AppendFailure, Committed, Origin};
use crate::db::models::{message, NewMessage};

/// One message to store, and whom to tell the outcome.
pub struct Append {
    pub message: NewMessage,
    pub origin: Origin,
}

/// How long a writer drains its lane before it lets the other work in its mailbox run (its
/// upkeep, a search's indexing); the lane goes on right after.
const DRAIN_TURN: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct Committer {
    db: Db,
    lanes: Vec<Arc<Lane>>,
    batch_max: usize,
    notify: Recipient<Committed>,
}

impl Committer {
    /// One lane per writer of `db`: one for SQLite, a few for PostgreSQL.
    pub fn new(db: Db, batch_max: usize, notify: Recipient<Committed>) -> Committer {
        let lanes = (0..db.writer_lanes())
            .map(|_| Arc::new(Lane::default()))
            .collect();
        Committer {
            db,
            lanes,
            batch_max: batch_max.max(1),
            notify,
        }
    }

    /// Queues `append` on its conversation's lane; where the lane's writer is not draining it,
    /// it is asked to.
    pub fn append(&self, append: Append) {
        let lane = self.lane_of(&append.message.session_id);
        let start = {
            let mut queue = self.lanes[lane].lock();
            queue.waiting.push_back(append);
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            let drain = DrainLane {
                lane: self.lanes[lane].clone(),
                batch_max: self.batch_max,
                notify: self.notify.clone(),
            };
            if let Err(drain) = self.db.drain(lane, drain) {
                // Only while the server stops: what is queued is not stored, and said so.
                while let Some(batch) = drain.lane.take(usize::MAX) {
                    let outcomes = batch
                        .into_iter()
                        .map(|a| (a.origin, Err(AppendFailure::Store)))
                        .collect();
                    drain.notify.do_send(Committed { outcomes });
                }
            }
        }
    }

    fn lane_of(&self, session_id: &str) -> usize {
        let mut h = DefaultHasher::new();
        session_id.hash(&mut h);
        (h.finish() % self.lanes.len() as u64) as usize
    }
}

/// The messages waiting for one writer.
#[derive(Default)]
pub(super) struct Lane(Mutex<Queue>);

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Append>,
    /// A [`DrainLane`] is on its way to the writer or running: nobody else asks for one.
    draining: bool,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The lock is only held to move messages in and out: nothing can panic half-way.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next batch, oldest first, at most `max`; `None` when the lane is empty, which ends
    /// the drain.
    fn take(&self, max: usize) -> Option<Vec<Append>> {
        let mut queue = self.lock();
        if queue.waiting.is_empty() {
            queue.draining = false;
            return None;
        }
        let take = queue.waiting.len().min(max);
        Some(queue.waiting.drain(..take).collect())
    }
}

/// Asks a writer to store what waits in its lane, a batch per transaction, until the lane is
/// empty.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct DrainLane {
    lane: Arc<Lane>,
    batch_max: usize,
    notify: Recipient<Committed>,
}

impl Handler<DrainLane> for Persistence {
    type Result = ();

    fn handle(&mut self, drain: DrainLane, ctx: &mut SyncContext<Self>) {
        let turn = Instant::now();
        while let Some(batch) = drain.lane.take(drain.batch_max) {
            let count = batch.len();
            let (messages, origins): (Vec<NewMessage>, Vec<Origin>) =
                batch.into_iter().map(|a| (a.message, a.origin)).unzip();
            let outcomes = match self.unit(ctx, |c| Ok(message::append_batch(c, &messages)?)) {
                Ok(outcomes) => outcomes
                    .into_iter()
                    .map(|o| o.map_err(AppendFailure::Rejected))
                    .collect(),
                Err(e) => {
                    log::error!(
                        "storing a batch of {count} messages failed; none is acknowledged: {e}"
                    );
                    vec![Err(AppendFailure::Store); count]
                }
            };
            drain.notify.do_send(Committed {
                outcomes: origins.into_iter().zip(outcomes).collect(),
            });
            if self.upkeep_queued() || turn.elapsed() >= DRAIN_TURN {
                ctx.address().do_send(drain);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::actors::persistence::tests::sqlite_db;

    /// Passes on what the writer sends back.
    struct Collect(mpsc::UnboundedSender<Committed>);

    impl Actor for Collect {
        type Context = Context<Self>;
    }

    impl Handler<Committed> for Collect {
        type Result = ();

        fn handle(&mut self, msg: Committed, _: &mut Context<Self>) {
            let _ = self.0.send(msg);
        }
    }

    fn posted(i: usize) -> Append {
        Append {
            message: NewMessage {
                session_id: "s".into(),
                role: "user",
                author_id: Some("u".into()),
                content: format!("message {i}"),
                client_id: Some(format!("c{i}")),
                interrupted: false,
                model: None,
                tokens: None,
            },
            origin: Origin::Reply {
                session_id: "s".into(),
                reply_id: format!("r{i}"),
            },
        }
    }

    /// What waits in a lane when the writer gets to it goes in as few transactions as
    /// `batch_max` allows, oldest first, and each is answered once, in order.
    #[actix_rt::test]
    async fn what_queues_during_a_transaction_goes_in_the_next_ones_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite_db(&dir).await;
        let (sent, mut answers) = mpsc::unbounded_channel();
        let committer = Committer::new(db.clone(), 4, Collect(sent).start().recipient());

        // Keep the writer busy while ten messages are posted.
        let (started, busy) = oneshot::channel();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let writer = db.clone();
        let holding = actix_rt::spawn(async move {
            writer
                .write(0, move |_| {
                    let _ = started.send(());
                    let _ = held.recv();
                    Ok(())
                })
                .await
        });
        busy.await.unwrap();
        for i in 0..10 {
            committer.append(posted(i));
        }
        release.send(()).unwrap();
        holding.await.unwrap().unwrap();

        let mut batches = Vec::new();
        let mut seqs = Vec::new();
        while seqs.len() < 10 {
            let committed = tokio::time::timeout(Duration::from_secs(10), answers.recv())
                .await
                .expect("every message is answered")
                .unwrap();
            batches.push(committed.outcomes.len());
            for (i, (origin, outcome)) in committed.outcomes.into_iter().enumerate() {
                let Origin::Reply { reply_id, .. } = origin else {
                    panic!("the origin came back changed");
                };
                let stored = outcome.expect("stored").message;
                assert_eq!(
                    reply_id,
                    format!("r{}", seqs.len()),
                    "answer {i} of its batch"
                );
                assert_eq!(stored.content, format!("message {}", seqs.len()));
                seqs.push(stored.seq);
            }
        }
        assert_eq!(batches, [4, 4, 2], "three transactions of at most four");
        assert_eq!(seqs, (1..=10).collect::<Vec<i64>>());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), answers.recv())
                .await
                .is_err(),
            "nothing is answered twice"
        );
    }
}
