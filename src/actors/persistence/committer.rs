//! Committer: groups writes (group commit) in front of the persistence actor.
//!
//! Runs on the system arbiter. The SessionManager posts every message here; the committer
//! routes each conversation to one lane (so one conversation is never written by two
//! transactions at once, which keeps `seq` gap-free and ordered), and each lane keeps at most
//! one transaction in flight. While a transaction runs, new messages queue; when it ends they
//! all go in the next one. Under load batches grow, so throughput grows with load. Outcomes go
//! back to the SessionManager in one `Committed` per batch, in order, after the commit.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use actix::prelude::*;

use super::Db;
use crate::actors::session_manager::messages::{AppendFailure, Committed, Origin};
use crate::db::models::{message, NewMessage};

/// Store one message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Append {
    pub message: NewMessage,
    pub origin: Origin,
}

/// A lane's transaction ended.
#[derive(Message)]
#[rtype(result = "()")]
struct LaneDone {
    lane: usize,
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Append>,
    busy: bool,
}

pub struct Committer {
    db: Db,
    lanes: Vec<Lane>,
    batch_max: usize,
    notify: Recipient<Committed>,
}

impl Committer {
    /// One lane per writer of `db`: one for SQLite, a few for PostgreSQL.
    pub fn new(db: Db, batch_max: usize, notify: Recipient<Committed>) -> Committer {
        let lanes = db.writer_lanes();
        Committer {
            db,
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            batch_max: batch_max.max(1),
            notify,
        }
    }

    fn lane_of(&self, session_id: &str) -> usize {
        let mut h = DefaultHasher::new();
        session_id.hash(&mut h);
        (h.finish() % self.lanes.len() as u64) as usize
    }

    fn flush(&mut self, lane: usize, ctx: &mut Context<Self>) {
        let l = &mut self.lanes[lane];
        if l.busy || l.queue.is_empty() {
            return;
        }
        l.busy = true;
        let take = l.queue.len().min(self.batch_max);
        let (messages, origins): (Vec<NewMessage>, Vec<Origin>) =
            l.queue.drain(..take).map(|a| (a.message, a.origin)).unzip();
        let db = self.db.clone();
        let notify = self.notify.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let count = messages.len();
            let outcomes = match db
                .write(lane, move |c| Ok(message::append_batch(c, &messages)?))
                .await
            {
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
            notify.do_send(Committed {
                outcomes: origins.into_iter().zip(outcomes).collect(),
            });
            me.do_send(LaneDone { lane });
        });
    }
}

impl Actor for Committer {
    type Context = Context<Self>;
}

impl Handler<Append> for Committer {
    type Result = ();

    fn handle(&mut self, msg: Append, ctx: &mut Context<Self>) {
        let lane = self.lane_of(&msg.message.session_id);
        self.lanes[lane].queue.push_back(msg);
        self.flush(lane, ctx);
    }
}

impl Handler<LaneDone> for Committer {
    type Result = ();

    fn handle(&mut self, msg: LaneDone, ctx: &mut Context<Self>) {
        self.lanes[msg.lane].busy = false;
        self.flush(msg.lane, ctx);
    }
}
