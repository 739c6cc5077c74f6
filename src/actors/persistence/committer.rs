//! Committer: groups writes (group commit) in front of the persistence actor's writers.
//!
//! Every message is handed to [`Committer::append`] (by the SessionManager, or by a socket
//! through [`Writes`](crate::actors::session_manager::Writes)) and waits in one queue that the
//! writers drain themselves: while a transaction runs new messages queue, and when it ends the
//! writer takes what waits into the next one at once, with no other thread in between. Under
//! load batches grow, so throughput grows with load.
//!
//! SQLite has one writer. On PostgreSQL there are a few, and one drains the queue alone until
//! it falls behind: another joins only when `JOIN_AT` messages wait, and leaves once it finds
//! nothing to take. So at a steady load each transaction stores several messages (a call costs
//! PostgreSQL a fixed part that one more message hardly adds to), and at full load every
//! writer works. A conversation is in one transaction at a time, whichever writer holds it,
//! which keeps `seq` gap-free and ordered; its later messages wait in the queue for that
//! transaction to end.
//!
//! Outcomes go from the writer to the SessionManager in one `Committed` per batch, after the
//! commit and before the batch's conversations are let go, so that each conversation's
//! outcomes arrive in order. Neither the next batch nor the outcomes wait for the
//! SessionManager's thread.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
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

/// How long a writer drains the queue before it lets the other work in its mailbox run (its
/// upkeep, a search's indexing); it goes on right after.
const DRAIN_TURN: Duration = Duration::from_millis(20);

/// Messages waiting, with a writer at work, before one more writer is asked to help: fewer
/// than one transaction takes, so that a second writer starts before the queue is a whole
/// transaction behind (docs/benchmarks.md, change 31).
const JOIN_AT: usize = 32;

#[derive(Clone)]
pub struct Committer {
    db: Db,
    queue: Arc<SharedQueue>,
    batch_max: usize,
    notify: Recipient<Committed>,
}

impl Committer {
    /// One queue for the writers of `db`: one on SQLite, a few on PostgreSQL.
    pub fn new(db: Db, batch_max: usize, notify: Recipient<Committed>) -> Committer {
        Committer {
            queue: Arc::new(SharedQueue::new(db.writers())),
            db,
            batch_max: batch_max.max(1),
            notify,
        }
    }

    /// Queues `append`; where no writer is draining the queue, or it is falling behind, one
    /// more is asked to.
    pub fn append(&self, append: Append) {
        let wake = {
            let mut queue = self.queue.lock();
            queue.waiting.push_back(append);
            queue.writer_to_wake(JOIN_AT)
        };
        let Some(writer) = wake else {
            return;
        };
        let drain = DrainQueue {
            queue: self.queue.clone(),
            writer,
            batch_max: self.batch_max,
            notify: self.notify.clone(),
        };
        if let Err(drain) = self.db.drain(writer, drain) {
            // Only while the server stops: what is queued is not stored, and said so.
            let waiting = drain.queue.give_up(writer);
            if !waiting.is_empty() {
                let outcomes = waiting
                    .into_iter()
                    .map(|a| (a.origin, Err(AppendFailure::Store)))
                    .collect();
                drain.notify.do_send(Committed { outcomes });
            }
        }
    }
}

/// The messages waiting for the writers.
pub(super) struct SharedQueue(Mutex<Queue>);

struct Queue {
    waiting: VecDeque<Append>,
    /// The conversations in a transaction now, and whose: their later messages wait for it.
    writing: HashMap<String, usize>,
    /// Per writer: a [`DrainQueue`] is on its way to it or running.
    draining: Vec<bool>,
    /// A writer found nothing to take while messages waited (their conversations held by
    /// another): no other writer is asked to help until a transaction lets some go.
    stalled: bool,
}

impl SharedQueue {
    fn new(writers: usize) -> SharedQueue {
        SharedQueue(Mutex::new(Queue {
            waiting: VecDeque::new(),
            writing: HashMap::new(),
            draining: vec![false; writers.max(1)],
            stalled: false,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The lock is only held to move messages in and out: nothing can panic half-way.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next batch for `writer`, oldest first, at most `max`, of conversations no other
    /// writer holds; `None` when there is none, which ends this writer's drain.
    fn take(&self, writer: usize, max: usize) -> Option<Vec<Append>> {
        self.lock().take(writer, max)
    }

    /// `writer`'s transaction is over and its outcomes sent: its conversations are free.
    fn release(&self, writer: usize) {
        self.lock().release(writer);
    }

    /// `writer` cannot be reached (the server is stopping): everything waiting, to be refused.
    fn give_up(&self, writer: usize) -> Vec<Append> {
        let mut queue = self.lock();
        queue.draining[writer] = false;
        queue.waiting.drain(..).collect()
    }
}

impl Queue {
    fn release(&mut self, writer: usize) {
        self.writing.retain(|_, w| *w != writer);
        self.stalled = false;
    }

    /// The writer to ask to drain, now that a message was queued, marked as draining: the
    /// first idle one where none is draining, another where `join_at` messages wait.
    fn writer_to_wake(&mut self, join_at: usize) -> Option<usize> {
        let busy = self.draining.iter().any(|d| *d);
        if busy && (self.waiting.len() < join_at || self.stalled) {
            return None;
        }
        let idle = self.draining.iter().position(|d| !*d)?;
        self.draining[idle] = true;
        Some(idle)
    }

    /// While several writers drain, each takes the conversations of its share (by hash), so
    /// that one does not take every conversation and leave the others nothing; one alone
    /// takes them all.
    fn take(&mut self, writer: usize, max: usize) -> Option<Vec<Append>> {
        let draining = self.draining.iter().filter(|d| **d).count();
        // This writer's place among those draining: the share of the conversations it takes.
        let place = self.draining[..writer].iter().filter(|d| **d).count();
        let mut batch = Vec::new();
        // Messages left for another writer stay, in their order, at the front.
        let mut left = Vec::new();
        while batch.len() < max {
            let Some(append) = self.waiting.pop_front() else {
                break;
            };
            let session_id = &append.message.session_id;
            let mine = match self.writing.get(session_id) {
                Some(w) => *w == writer,
                None => {
                    let mine = draining == 1 || share_of(session_id, draining) == place;
                    if mine {
                        self.writing.insert(session_id.clone(), writer);
                    }
                    mine
                }
            };
            if mine {
                batch.push(append);
            } else {
                left.push(append);
            }
        }
        for append in left.into_iter().rev() {
            self.waiting.push_front(append);
        }
        if batch.is_empty() {
            self.draining[writer] = false;
            self.stalled = !self.waiting.is_empty();
            return None;
        }
        Some(batch)
    }
}

/// Which of `writers` draining writers takes a conversation no transaction holds.
fn share_of(session_id: &str, writers: usize) -> usize {
    let mut h = DefaultHasher::new();
    session_id.hash(&mut h);
    (h.finish() % writers as u64) as usize
}

/// Asks a writer to store what waits in the queue, a batch per transaction, until it finds
/// nothing to take.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct DrainQueue {
    queue: Arc<SharedQueue>,
    writer: usize,
    batch_max: usize,
    notify: Recipient<Committed>,
}

impl Handler<DrainQueue> for Persistence {
    type Result = ();

    fn handle(&mut self, drain: DrainQueue, ctx: &mut SyncContext<Self>) {
        let turn = Instant::now();
        while let Some(batch) = drain.queue.take(drain.writer, drain.batch_max) {
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
            drain.queue.release(drain.writer);
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

    fn in_conversation(session_id: &str, i: usize) -> Append {
        let mut append = posted(i);
        append.message.session_id = session_id.into();
        append
    }

    fn queue_of(writers: usize, appends: impl IntoIterator<Item = Append>) -> Queue {
        let mut queue = SharedQueue::new(writers).0.into_inner().unwrap();
        queue.waiting.extend(appends);
        queue
    }

    fn contents(batch: &[Append]) -> Vec<String> {
        batch.iter().map(|a| a.message.content.clone()).collect()
    }

    /// One writer drains alone until `JOIN_AT` messages wait; a second is not asked while
    /// the first holds every conversation that waits, and is again once it lets one go.
    #[test]
    fn a_second_writer_joins_only_when_the_first_falls_behind() {
        let mut queue = queue_of(2, [posted(0)]);
        assert_eq!(
            queue.writer_to_wake(JOIN_AT),
            Some(0),
            "nobody drains: the first"
        );
        assert_eq!(
            queue.writer_to_wake(JOIN_AT),
            None,
            "one drains, one message waits"
        );
        queue.waiting.extend((1..JOIN_AT).map(posted));
        assert_eq!(queue.writer_to_wake(JOIN_AT), Some(1), "{JOIN_AT} wait");
        assert_eq!(queue.writer_to_wake(JOIN_AT), None, "nobody left to ask");

        // Writer 0 takes a few of conversation `s`; writer 1 finds the rest held.
        let first = queue.take(0, 4).unwrap();
        assert_eq!(
            contents(&first),
            ["message 0", "message 1", "message 2", "message 3"]
        );
        assert!(queue.take(1, 4).is_none(), "all of `s` is writer 0's");
        assert!(!queue.draining[1] && queue.stalled);
        assert_eq!(
            queue.writer_to_wake(JOIN_AT),
            None,
            "stalled: asking writer 1 again would find nothing"
        );
        queue.release(0);
        queue.waiting.extend((JOIN_AT..JOIN_AT + 4).map(posted));
        assert_eq!(
            queue.writer_to_wake(JOIN_AT),
            Some(1),
            "writer 0 let `s` go"
        );
    }

    /// A conversation another writer holds is left, in order, for later; the writer that
    /// holds it takes its next messages, and once it lets it go anyone may.
    #[test]
    fn a_conversation_is_in_one_transaction_at_a_time_and_stays_in_order() {
        let mut queue = queue_of(
            2,
            [
                in_conversation("a", 0),
                in_conversation("b", 1),
                in_conversation("a", 2),
            ],
        );
        queue.draining = vec![true, false];
        assert_eq!(contents(&queue.take(0, 1).unwrap()), ["message 0"]);
        // Writer 1 drains alone from here: everything not held is its own.
        queue.draining = vec![false, true];
        assert_eq!(
            contents(&queue.take(1, 10).unwrap()),
            ["message 1"],
            "`a` is writer 0's until it lets it go"
        );
        assert_eq!(contents(queue.waiting.make_contiguous()), ["message 2"]);
        queue.release(1);
        assert!(queue.take(1, 10).is_none(), "`a` is still writer 0's");
        queue.draining[1] = true;
        queue.release(0);
        assert_eq!(contents(&queue.take(1, 10).unwrap()), ["message 2"]);
    }

    /// While two writers drain, each takes its share of the conversations, so that both
    /// have work; alone, a writer takes every conversation.
    #[test]
    fn writers_draining_together_split_the_conversations() {
        let appends = (0..40).map(|i| in_conversation(&format!("c{i}"), i));
        let mut queue = queue_of(2, appends);
        queue.draining = vec![true, true];
        let zero = queue.take(0, 100).unwrap();
        let one = queue.take(1, 100).unwrap();
        assert!(
            !zero.is_empty() && !one.is_empty(),
            "{:?} / {:?}",
            contents(&zero),
            contents(&one)
        );
        assert_eq!(zero.len() + one.len(), 40);
        for append in &zero {
            assert_eq!(share_of(&append.message.session_id, 2), 0);
        }
        assert!(queue.waiting.is_empty());

        let mut queue = queue_of(2, (0..40).map(|i| in_conversation(&format!("c{i}"), i)));
        queue.draining = vec![false, true];
        assert_eq!(queue.take(1, 100).unwrap().len(), 40, "alone, it takes all");
        assert!(queue.take(1, 100).is_none());
        assert!(
            !queue.draining[1] && !queue.stalled,
            "an empty queue is not a stall"
        );
    }

    /// What waits in the queue when the writer gets to it goes in as few transactions as
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
