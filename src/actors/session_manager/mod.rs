//! SessionManager: the live state of this node, and the router of every conversation event.
//!
//! One per node, on the system arbiter. It owns the connections (their bounded outboxes),
//! which connection is in which conversation, each connection's resume state, and the AI
//! answer in flight per conversation. WsSession actors and HTTP handlers talk to it; it hands
//! writes to the Committer, answers to the InferencePool, and history reads to the persistence
//! actor. A socket's message goes to the Committer without it ([`Writes`]), and its outcome
//! comes back to it. It does not authenticate, rate-limit or call providers: those live
//! elsewhere.
//! It decides when a conversation gets an AI turn: a customer's burst of messages becomes one
//! turn (`AI_BATCH_SIZE`, `AI_BATCH_TIMEOUT`), and a conversation no AI provider can answer
//! goes to the human queue (`offer_to_human`). The agent desk (dashboards, takeover, the human
//! queue) keeps its state in `desk.rs`.
//!
//! Every event is serialised once and the same bytes are queued for every recipient. A
//! recipient whose queue is full is a slow consumer: it is dropped and told so, and nobody
//! else waits for it.
//!
//! On shutdown (`Drain`) it takes no new messages or answers, cancels the answers in flight
//! (stored as interrupted), waits for every write handed to the committer to be settled
//! (acked or refused), then queues a close with a reason behind each socket's last frames.
//! Dashboards are sockets like the others; the human queue's timers stop at once and desk
//! changes are refused (`shutting_down`), since the stored waits are picked up by the next node.

pub mod desk;
pub mod messages;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::oneshot;

use self::messages::*;
use crate::actors::inference::{InferencePool, StartReply, AI_UNAVAILABLE};
use crate::actors::persistence::committer::{Append, Committer};
use crate::actors::persistence::Db;
use crate::db::models::message::{self, Order, Rejected};
use crate::db::models::session as sessions;
use crate::db::models::{serialize_time_string, Appended, ChatMessage, NewMessage, Role};
use crate::protocol::{MessageView, Peer, ServerFrame};

/// One queued event with what the router needs to know about it.
#[derive(Clone)]
struct Event {
    text: ByteString,
    kind: EventKind,
}

/// What an event shows, so that a replay can drop what it already delivered.
#[derive(Clone)]
enum EventKind {
    /// A stored message (`message`).
    Message { seq: i64 },
    /// A piece of the answer `reply_id`.
    Token { reply_id: String },
    /// The answer `reply_id` is stored as `seq`.
    ReplyDone { reply_id: String, seq: i64 },
    /// Presence, errors: delivered as they come.
    Other,
}

impl EventKind {
    /// The stored seq this event shows, if any.
    fn seq(&self) -> Option<i64> {
        match self {
            EventKind::Message { seq } | EventKind::ReplyDone { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    fn of(frame: &ServerFrame) -> EventKind {
        match frame {
            ServerFrame::Message(m) => EventKind::Message { seq: m.seq },
            ServerFrame::Token { reply_id, .. } => EventKind::Token {
                reply_id: reply_id.clone(),
            },
            ServerFrame::ReplyDone { reply_id, seq, .. } => EventKind::ReplyDone {
                reply_id: reply_id.clone(),
                seq: *seq,
            },
            _ => EventKind::Other,
        }
    }
}

enum MemberState {
    /// Waiting for the replay of stored messages; live events are held here meanwhile.
    Replaying {
        /// Tells this replay's pages from those of an earlier `resume` of the same member.
        replay: u64,
        held: Vec<Event>,
        /// Joined by `watch`: the replay ends with `watching` instead of `resumed`.
        watch: bool,
        /// The last page, read while the answer in flight was being stored: it is sent once
        /// that store is settled, so the replay and the held events agree on whether the
        /// answer is in the history.
        last_page: Option<Vec<ByteString>>,
        read: Read,
    },
    Live,
}

/// Where a replay's reading of the history stands. One read at a time per member, however
/// often the client resumes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// This replay's page is being read.
    InFlight,
    /// A read for an earlier replay is still out; this one's starts when it is back.
    Queued,
    /// The last page is read (and waits in `last_page`).
    Done,
}

struct Member {
    state: MemberState,
    /// Highest stored seq delivered to this member (`message`, `reply_done`); a later copy
    /// of the same or an older seq is skipped.
    delivered: i64,
}

struct Connection {
    user_id: String,
    role: Role,
    outbox: Outbox,
    kick: Recipient<Kick>,
    sessions: HashSet<String>,
    pending_acks: Arc<AtomicUsize>,
}

enum ReplyState {
    Streaming,
    /// The answer ended and is being stored.
    Committing,
}

struct LiveReply {
    reply_id: String,
    text: String,
    state: ReplyState,
    cancel: Option<oneshot::Sender<()>>,
}

/// Customer messages arriving in a burst, waiting to become one AI turn.
struct Burst {
    messages: usize,
    /// Starts the turn when the customer pauses.
    timer: SpawnHandle,
}

/// How customer messages are gathered into AI turns (`AI_BATCH_SIZE`, `AI_BATCH_TIMEOUT`).
#[derive(Debug, Clone, Copy)]
pub struct Coalescing {
    pub max_messages: usize,
    /// Zero answers each message at once.
    pub pause: Duration,
}

#[derive(Default)]
struct Conversation {
    members: HashMap<ConnId, Member>,
    /// Who is present (what `presence` lists), with their number of connections here: the
    /// list goes out when a person comes or goes, not for a second tab of the same person.
    peers: Census<Peer>,
    reply: Option<LiveReply>,
    /// A customer wrote while an answer was in flight: answer again when it is stored.
    turn_pending: bool,
    burst: Option<Burst>,
}

impl Conversation {
    /// Adds a member, or replaces its state; true when a person arrived who was not here.
    fn add_member(&mut self, conn_id: ConnId, member: Member, peer: Peer) -> bool {
        self.members.insert(conn_id, member).is_none() && self.peers.add(peer)
    }

    /// Removes a member; true when that was the person's last connection here.
    fn remove_member(&mut self, conn_id: ConnId, peer: &Peer) -> bool {
        self.members.remove(&conn_id).is_some() && self.peers.remove(peer)
    }
}

/// Who is there, with how many connections each: a person is listed from their first
/// connection to their last, so a second tab changes nothing. Conversations count their
/// members with it (`presence`), the desk its dashboards (`agents_online`).
struct Census<K>(BTreeMap<K, usize>);

impl<K> Default for Census<K> {
    fn default() -> Self {
        Census(BTreeMap::new())
    }
}

impl<K: Ord + Clone> Census<K> {
    /// Counts one more connection of `who`; true when it is their first.
    fn add(&mut self, who: K) -> bool {
        let n = self.0.entry(who).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Counts one connection of `who` less; true when it was their last.
    fn remove(&mut self, who: &K) -> bool {
        match self.0.get_mut(who) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.0.remove(who);
                true
            }
            None => false,
        }
    }

    /// Everyone there, in order.
    fn list(&self) -> Vec<K> {
        self.0.keys().cloned().collect()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

impl Connection {
    fn peer(&self) -> Peer {
        Peer {
            user_id: self.user_id.clone(),
            role: self.role.as_str().to_string(),
        }
    }
}

pub struct SessionManager {
    db: Db,
    inference: InferencePool,
    writes: Writes,
    resume_max: i64,
    /// Events held for one replaying member before it counts as a slow consumer.
    held_max: usize,
    coalescing: Coalescing,
    connections: HashMap<ConnId, Connection>,
    conversations: HashMap<String, Conversation>,
    desk: desk::Desk,
    /// Numbers each `resume`, so a page read for an earlier one is recognised as stale.
    next_replay: u64,
    /// Set once shutdown began: who waits for it to end.
    draining: Option<Vec<oneshot::Sender<()>>>,
}

/// The way to the store that does not wait for the SessionManager's thread: a socket hands
/// its message straight to the committer's queue, and the outcome comes back to the
/// SessionManager, which acknowledges and delivers it. Every write is counted until its
/// outcome is back, so that shutdown waits for it; once shutdown began, a socket's message is
/// given back, for the SessionManager to refuse. Every socket holds one: a clone is one
/// pointer.
#[derive(Clone)]
pub struct Writes(Arc<WritesShared>);

struct WritesShared {
    committer: Committer,
    /// Handed to the committer, outcome not back yet.
    pending: AtomicUsize,
    /// Shutdown began: sockets' messages are not taken.
    closing: AtomicBool,
}

impl Writes {
    /// Hands a socket's message to the committer, or gives it back once shutdown began.
    pub fn post(&self, msg: PostMessage) -> Result<(), Box<PostMessage>> {
        // Counted before `closing` is read, and `closing` is set before the count is read
        // (`close`, then `pending`): one side always sees the other.
        self.0.pending.fetch_add(1, Ordering::SeqCst);
        if self.0.closing.load(Ordering::SeqCst) {
            self.0.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(Box::new(msg));
        }
        self.0.committer.append(msg.into_append());
        Ok(())
    }

    /// Shutdown began: sockets' messages are given back from now on. Called before the count
    /// of writes in flight is read for the drain.
    fn close(&self) {
        self.0.closing.store(true, Ordering::SeqCst);
    }

    /// Hands a write to the committer whether or not shutdown began (an answer being stopped is
    /// still stored).
    fn store(&self, append: Append) {
        self.0.pending.fetch_add(1, Ordering::SeqCst);
        self.0.committer.append(append);
    }

    /// Outcomes came back for `n` writes.
    fn settled(&self, n: usize) {
        let _ = self
            .0
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                Some(p.saturating_sub(n))
            });
    }

    fn pending(&self) -> usize {
        self.0.pending.load(Ordering::SeqCst)
    }
}

impl PostMessage {
    /// What is stored: a staff member's message as `agent`, anyone else's as `user`.
    fn into_append(self) -> Append {
        let role = if self.role.is_staff() {
            "agent"
        } else {
            "user"
        };
        Append {
            message: NewMessage {
                session_id: self.session_id,
                role,
                author_id: Some(self.author_id),
                content: self.content,
                client_id: self.client_id,
                interrupted: false,
                model: None,
                tokens: None,
            },
            origin: self.origin,
        }
    }
}

impl SessionManager {
    /// Starts the manager and its committer; sockets hand their messages to the committer
    /// through the [`Writes`] returned.
    pub fn start(
        db: Db,
        inference: InferencePool,
        batch_max: usize,
        resume_max: i64,
        held_max: usize,
        coalescing: Coalescing,
        desk_settings: desk::DeskSettings,
    ) -> (Addr<SessionManager>, Writes) {
        let mut handed_out = None;
        let manager = SessionManager::create(|ctx| {
            let writes = Writes(Arc::new(WritesShared {
                committer: Committer::new(db.clone(), batch_max, ctx.address().recipient()),
                pending: AtomicUsize::new(0),
                closing: AtomicBool::new(false),
            }));
            handed_out = Some(writes.clone());
            let mut manager = SessionManager {
                writes,
                db,
                inference,
                resume_max: resume_max.max(1),
                held_max: held_max.max(1),
                coalescing,
                connections: HashMap::new(),
                conversations: HashMap::new(),
                desk: desk::Desk::new(desk_settings),
                next_replay: 1,
                draining: None,
            };
            desk::start(&mut manager, ctx);
            manager
        });
        let writes = handed_out.expect("the manager was created in place");
        (manager, writes)
    }

    /// Queues `out` on a connection. A full queue means a slow consumer: it is dropped.
    fn push(&mut self, conn_id: ConnId, out: Out) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        match conn.outbox.try_send(out) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.drop_slow(conn_id),
            // The socket is closing; its Disconnect is on the way.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    fn drop_slow(&mut self, conn_id: ConnId) {
        if let Some(conn) = self.connections.get(&conn_id) {
            log::warn!(
                "connection {conn_id} ({}) cannot keep up; disconnecting it",
                conn.user_id
            );
            conn.kick.do_send(Kick {
                code: "slow_consumer",
                message: "you are not reading fast enough; reconnect and resume".into(),
            });
        }
        self.forget(conn_id);
    }

    /// Removes a connection from every conversation and tells the others who is left.
    fn forget(&mut self, conn_id: ConnId) {
        let Some(conn) = self.connections.remove(&conn_id) else {
            return;
        };
        self.desk_forget(conn_id);
        let peer = conn.peer();
        for session_id in conn.sessions {
            if let Some(conv) = self.conversations.get_mut(&session_id) {
                if conv.remove_member(conn_id, &peer) {
                    self.announce_presence(&session_id, true, None);
                }
            }
            self.tidy(&session_id);
        }
    }

    /// Forgets a conversation nobody is in and nothing is happening in.
    fn tidy(&mut self, session_id: &str) {
        if let Some(conv) = self.conversations.get(session_id) {
            if conv.members.is_empty()
                && conv.reply.is_none()
                && !conv.turn_pending
                && conv.burst.is_none()
            {
                self.conversations.remove(session_id);
            }
        }
    }

    /// Sends one event to every member of a conversation, serialised once.
    fn broadcast(&mut self, session_id: &str, frame: &ServerFrame) {
        self.deliver(session_id, frame, None);
    }

    /// Queues an event for every member of a conversation, or for the member `only`.
    fn deliver(&mut self, session_id: &str, frame: &ServerFrame, only: Option<ConnId>) {
        let event = Event {
            text: ByteString::from(frame.to_text()),
            kind: EventKind::of(frame),
        };
        let Some(conv) = self.conversations.get_mut(session_id) else {
            return;
        };
        let mut deliver = Vec::new();
        let mut overflowing = Vec::new();
        let (one, all) = match only {
            Some(conn_id) => (conv.members.get_mut(&conn_id).map(|m| (conn_id, m)), None),
            None => (None, Some(conv.members.iter_mut().map(|(id, m)| (*id, m)))),
        };
        for (conn_id, member) in one.into_iter().chain(all.into_iter().flatten()) {
            match &mut member.state {
                MemberState::Replaying { held, .. } if held.len() >= self.held_max => {
                    overflowing.push(conn_id)
                }
                MemberState::Replaying { held, .. } => held.push(event.clone()),
                MemberState::Live => {
                    if let Some(seq) = event.kind.seq() {
                        if seq <= member.delivered {
                            continue;
                        }
                        member.delivered = seq;
                    }
                    deliver.push(conn_id);
                }
            }
        }
        for conn_id in deliver {
            self.push(conn_id, Out::Frame(event.text.clone()));
        }
        for conn_id in overflowing {
            self.drop_slow(conn_id);
        }
    }

    fn send_frame(&mut self, conn_id: ConnId, frame: &ServerFrame) {
        self.push(conn_id, Out::Frame(ByteString::from(frame.to_text())));
    }

    /// Tells the members who is present: everyone when that `changed`, else only a `joiner`
    /// (who has not seen the list yet).
    fn announce_presence(&mut self, session_id: &str, changed: bool, joiner: Option<ConnId>) {
        if !changed && joiner.is_none() {
            return;
        }
        let Some(conv) = self.conversations.get(session_id) else {
            return;
        };
        let frame = ServerFrame::Presence {
            session_id: session_id.to_string(),
            members: conv.peers.list(),
        };
        if changed {
            self.desk.presence_changed(session_id);
            self.broadcast(session_id, &frame);
        } else {
            self.deliver(session_id, &frame, joiner);
        }
    }

    /// The answer in flight in a conversation, if it is `reply_id` (any answer when `None`).
    fn reply_mut(&mut self, session_id: &str, reply_id: Option<&str>) -> Option<&mut LiveReply> {
        self.conversations
            .get_mut(session_id)
            .and_then(|c| c.reply.as_mut())
            .filter(|r| reply_id.is_none_or(|id| r.reply_id == id))
    }

    /// A customer message was stored: answer it, or wait briefly for the rest of a burst so
    /// that the burst gets one answer.
    fn customer_wrote(&mut self, session_id: &str, ctx: &mut Context<Self>) {
        let Coalescing {
            max_messages,
            pause,
        } = self.coalescing;
        // Where the AI is silent, no burst waits: `start_reply` notes the turn it skips.
        if pause.is_zero() || self.desk.human_hold(session_id).is_some() {
            return self.start_reply(session_id, ctx);
        }
        let conv = self
            .conversations
            .entry(session_id.to_string())
            .or_default();
        if conv.reply.is_some() {
            // Already one follow-up turn for whatever arrives during an answer.
            conv.turn_pending = true;
            return;
        }
        let messages = match conv.burst.take() {
            Some(burst) => {
                ctx.cancel_future(burst.timer);
                burst.messages + 1
            }
            None => 1,
        };
        if messages >= max_messages {
            return self.start_reply(session_id, ctx);
        }
        let sid = session_id.to_string();
        let timer = ctx.run_later(pause, move |act, ctx| {
            if let Some(conv) = act.conversations.get_mut(&sid) {
                conv.burst = None;
            }
            act.start_reply(&sid, ctx);
        });
        conv.burst = Some(Burst { messages, timer });
    }

    /// Forgets a burst waiting for its turn (the answer was stopped before it started).
    fn drop_burst(&mut self, session_id: &str, ctx: &mut Context<Self>) {
        if let Some(burst) = self
            .conversations
            .get_mut(session_id)
            .and_then(|c| c.burst.take())
        {
            ctx.cancel_future(burst.timer);
        }
        self.tidy(session_id);
    }

    /// Asks the pool for an AI answer in a conversation, unless one is already in flight.
    fn start_reply(&mut self, session_id: &str, ctx: &mut Context<Self>) {
        if self.draining.is_some() {
            return; // no new answers while shutting down
        }
        if self.desk.ai_silent(session_id) {
            // Taken over or waiting for a human: the AI stays silent.
            if let Some(conv) = self.conversations.get_mut(session_id) {
                conv.turn_pending = false;
            }
            return;
        }
        let conv = self
            .conversations
            .entry(session_id.to_string())
            .or_default();
        if conv.reply.is_some() {
            conv.turn_pending = true;
            return;
        }
        conv.turn_pending = false;
        let reply_id = uuid::Uuid::new_v4().to_string();
        let (cancel_tx, cancel_rx) = oneshot::channel();
        conv.reply = Some(LiveReply {
            reply_id: reply_id.clone(),
            text: String::new(),
            state: ReplyState::Streaming,
            cancel: Some(cancel_tx),
        });
        let me = ctx.address();
        self.inference.start_reply(StartReply {
            session_id: session_id.to_string(),
            reply_id,
            cancel: cancel_rx,
            tokens: me.clone().recipient(),
            finished: me.recipient(),
        });
    }

    fn message_view(m: &ChatMessage) -> MessageView {
        MessageView {
            session_id: m.session_id.clone(),
            seq: m.seq,
            role: m.role.clone(),
            author_id: m.author_id.clone(),
            content: m.content.clone(),
            client_id: m.client_id.clone(),
            interrupted: m.interrupted,
            created_at: serialize_time_string(&m.created_at),
        }
    }

    fn failure_frame(
        session_id: &str,
        client_id: Option<String>,
        failure: &AppendFailure,
    ) -> ServerFrame {
        let (code, message) = match failure {
            AppendFailure::Rejected(Rejected::SessionNotFound) => {
                ("not_found", "no such conversation".to_string())
            }
            AppendFailure::Rejected(Rejected::SessionNotActive(status)) => (
                "session_not_active",
                format!("the conversation is {status}"),
            ),
            AppendFailure::Store => (
                "store_failed",
                "the message could not be stored; it was not delivered, send it again".to_string(),
            ),
            AppendFailure::ShuttingDown => (
                "shutting_down",
                "the server is restarting and did not store this; send it again after reconnecting"
                    .to_string(),
            ),
        };
        ServerFrame::Error {
            code: code.into(),
            message,
            session_id: Some(session_id.to_string()),
            client_id,
        }
    }

    /// Routes the outcome of one stored (or refused) message.
    fn settle(
        &mut self,
        origin: Origin,
        outcome: Result<Appended, AppendFailure>,
        ctx: &mut Context<Self>,
    ) {
        if let Origin::Socket { conn_id, .. } = &origin {
            if let Some(conn) = self.connections.get(conn_id) {
                // Saturating: a send that did not come through the counting path is fine.
                let _ = conn
                    .pending_acks
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        }
        match (origin, outcome) {
            (Origin::Socket { conn_id, .. }, Ok(appended)) => {
                let m = &appended.message;
                self.send_frame(
                    conn_id,
                    &ServerFrame::Ack {
                        session_id: m.session_id.clone(),
                        client_id: m.client_id.clone().unwrap_or_default(),
                        seq: m.seq,
                        duplicate: appended.duplicate,
                    },
                );
                self.after_store(&appended, ctx);
            }
            (
                Origin::Socket {
                    conn_id,
                    session_id,
                    client_id,
                },
                Err(failure),
            ) => {
                let frame = Self::failure_frame(&session_id, Some(client_id), &failure);
                self.send_frame(conn_id, &frame);
            }
            (Origin::Http(reply), outcome) => {
                if let Ok(appended) = &outcome {
                    self.after_store(appended, ctx);
                }
                let _ = reply.send(outcome);
            }
            (Origin::Ask(reply), outcome) => {
                let outcome = outcome.map(|appended| {
                    let earlier_reply = self
                        .reply_mut(&appended.message.session_id, None)
                        .map(|r| r.reply_id.clone());
                    self.after_store(&appended, ctx);
                    let human = self.desk.human_hold(&appended.message.session_id);
                    Asked {
                        appended,
                        earlier_reply,
                        human,
                    }
                });
                let _ = reply.send(outcome);
            }
            (
                Origin::Reply {
                    session_id,
                    reply_id,
                },
                outcome,
            ) => self.reply_stored(session_id, &reply_id, outcome, ctx),
        }
    }

    /// A newly stored message goes to every member; a customer's message gets an AI answer.
    fn after_store(&mut self, appended: &Appended, ctx: &mut Context<Self>) {
        if appended.duplicate {
            return;
        }
        let m = &appended.message;
        self.desk.message_stored(m);
        self.broadcast(&m.session_id, &ServerFrame::Message(Self::message_view(m)));
        if m.role == "user" {
            self.customer_wrote(&m.session_id.clone(), ctx);
        }
    }

    fn reply_stored(
        &mut self,
        session_id: String,
        reply_id: &str,
        outcome: Result<Appended, AppendFailure>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(conv) = self.conversations.get_mut(&session_id) {
            if conv.reply.as_ref().is_some_and(|r| r.reply_id == reply_id) {
                conv.reply = None;
            }
        }
        self.desk.touch(&session_id);
        match outcome {
            Ok(appended) => {
                let m = &appended.message;
                let frame = ServerFrame::ReplyDone {
                    session_id: session_id.clone(),
                    reply_id: reply_id.to_string(),
                    seq: m.seq,
                    interrupted: m.interrupted,
                };
                self.broadcast(&session_id, &frame);
            }
            Err(failure) => {
                log::error!(
                    "the AI answer {reply_id} in {session_id} could not be stored: {failure:?}"
                );
                let frame = Self::failure_frame(&session_id, None, &failure);
                self.broadcast(&session_id, &frame);
            }
        }
        self.finish_waiting_replays(&session_id);
        let pending = self
            .conversations
            .get(&session_id)
            .is_some_and(|c| c.turn_pending);
        if pending {
            self.start_reply(&session_id, ctx);
        }
        self.tidy(&session_id);
    }
}

impl Actor for SessionManager {
    type Context = Context<Self>;
}

impl SessionManager {
    /// Hands a message to the committer, counting it until its outcome comes back.
    fn store(&mut self, append: Append) {
        self.writes.store(append);
    }

    /// While shutting down: once no answer is in flight and every write is settled, closes
    /// every socket (after what is queued for it) and says the drain is over.
    fn check_drained(&mut self) {
        if self.draining.is_none()
            || self.writes.pending() > 0
            || self.conversations.values().any(|c| c.reply.is_some())
        {
            return;
        }
        self.close_all();
    }

    fn close_all(&mut self) {
        let Some(waiting) = self.draining.as_mut().map(std::mem::take) else {
            return;
        };
        for conn in self.connections.values() {
            let kick = Kick {
                code: "shutdown",
                message: "the server is restarting; reconnect and resume".into(),
            };
            // Behind the frames already queued (the last `reply_done`s); a socket with no
            // room left is closed at once.
            if conn.outbox.try_send(Out::Close(kick.clone())).is_err() {
                conn.kick.do_send(kick);
            }
        }
        // Nobody is told who left: everybody is leaving.
        self.connections.clear();
        self.conversations.clear();
        self.desk_closed();
        for done in waiting {
            let _ = done.send(());
        }
    }
}

impl Handler<Drain> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) {
        let first = self.draining.is_none();
        self.draining.get_or_insert_with(Vec::new).push(msg.done);
        // Before any count is read (see `Writes::post`).
        self.writes.close();
        if !first {
            return;
        }
        log::info!(
            "shutting down: interrupting {} answer(s), storing {} pending message(s)",
            self.conversations
                .values()
                .filter(|c| c.reply.is_some())
                .count(),
            self.writes.pending()
        );
        for conv in self.conversations.values_mut() {
            conv.turn_pending = false;
            if let Some(cancel) = conv.reply.as_mut().and_then(|r| r.cancel.take()) {
                let _ = cancel.send(());
            }
        }
        self.desk_drain(ctx);
        ctx.run_later(msg.grace, |act, _| {
            if act.draining.as_ref().is_some_and(|w| !w.is_empty()) {
                log::warn!(
                    "shutdown grace period over with {} message(s) still being stored; closing sockets",
                    act.writes.pending()
                );
                act.close_all();
            }
        });
        self.check_drained();
    }
}

impl Handler<Connect> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) {
        if self.draining.is_some() {
            msg.kick.do_send(Kick {
                code: "shutdown",
                message: "the server is restarting; reconnect and resume".into(),
            });
            return;
        }
        self.connections.insert(
            msg.conn_id,
            Connection {
                user_id: msg.user_id,
                role: msg.role,
                outbox: msg.outbox,
                kick: msg.kick,
                sessions: HashSet::new(),
                pending_acks: msg.pending_acks,
            },
        );
    }
}

impl Handler<Disconnect> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        self.forget(msg.conn_id);
    }
}

impl Handler<Join> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) {
        self.join(msg.conn_id, msg.session_id, msg.after_seq, false, ctx);
    }
}

impl SessionManager {
    /// Subscribes a connection; with `after_seq`, replays first (ending with `watching`
    /// when `watch`, else `resumed`).
    fn join(
        &mut self,
        conn_id: ConnId,
        session_id: String,
        after_seq: Option<i64>,
        watch: bool,
        ctx: &mut Context<Self>,
    ) {
        let Some(conn) = self.connections.get_mut(&conn_id) else {
            return;
        };
        // A socket joins the first time it sends somewhere (and again after leaving): a member
        // already (it resumed or watched first), it has nothing to do.
        if after_seq.is_none() && conn.sessions.contains(&session_id) {
            return;
        }
        let newly_joined = conn.sessions.insert(session_id.clone());
        let conv = self.conversations.entry(session_id.clone()).or_default();
        let peer = conn.peer();
        let Some(after_seq) = after_seq else {
            let arrived = conv.add_member(
                conn_id,
                Member {
                    state: MemberState::Live,
                    delivered: 0,
                },
                peer,
            );
            self.announce_presence(&session_id, arrived, Some(conn_id));
            return;
        };
        let mut held = Vec::new();
        // An answer being written: the joiner first gets what was written so far. If the
        // replay turns out to hold that answer already stored, this is dropped.
        if let Some(reply) = conv.reply.as_ref().filter(|r| !r.text.is_empty()) {
            let frame = ServerFrame::Token {
                session_id: session_id.clone(),
                reply_id: reply.reply_id.clone(),
                delta: reply.text.clone(),
            };
            held.push(Event {
                text: ByteString::from(frame.to_text()),
                kind: EventKind::of(&frame),
            });
        }
        let replay = self.next_replay;
        self.next_replay += 1;
        // A second `resume` replaces the first: its held events and pages are dropped, and
        // this one reads the history again from its own `after_seq` once the read in flight
        // (if any) is back, so resuming over and over costs one read at a time.
        let busy = conv.members.get(&conn_id).is_some_and(|m| {
            matches!(
                m.state,
                MemberState::Replaying {
                    read: Read::InFlight | Read::Queued,
                    ..
                }
            )
        });
        let arrived = conv.add_member(
            conn_id,
            Member {
                state: MemberState::Replaying {
                    replay,
                    held,
                    watch,
                    last_page: None,
                    read: if busy { Read::Queued } else { Read::InFlight },
                },
                delivered: after_seq,
            },
            peer,
        );
        if newly_joined {
            self.announce_presence(&session_id, arrived, Some(conn_id));
        }
        if !busy {
            self.fetch_replay(conn_id, session_id, replay, after_seq, ctx);
        }
    }
}

impl SessionManager {
    /// Reads the next page of stored messages for a replaying member.
    fn fetch_replay(
        &self,
        conn_id: ConnId,
        session_id: String,
        replay: u64,
        after: i64,
        ctx: &mut Context<Self>,
    ) {
        let db = self.db.clone();
        let limit = self.resume_max;
        let me = ctx.address();
        actix::spawn(async move {
            let sid = session_id.clone();
            let page = db
                .run(move |c| {
                    // Read first, so a message stored between the two reads is in `last_seq`
                    // and never taken for one beyond the end.
                    let last_seq = sessions::find(c, &sid)?.map_or(0, |s| s.last_seq);
                    let messages = message::page(c, &sid, Order::Asc, Some(after), limit)?;
                    Ok(ReplayPage { messages, last_seq })
                })
                .await
                .map_err(|e| log::error!("replaying {session_id} failed: {e}"));
            me.do_send(Replayed {
                conn_id,
                session_id,
                replay,
                page,
            });
        });
    }

    /// Sends a replaying member the last page of its replay, `resumed`, then the live events
    /// held meanwhile, less those the replay already holds; the member is live from here.
    fn finish_replay(&mut self, conn_id: ConnId, session_id: &str, mut batch: Vec<ByteString>) {
        let Some(member) = self
            .conversations
            .get_mut(session_id)
            .and_then(|c| c.members.get_mut(&conn_id))
        else {
            return;
        };
        let MemberState::Replaying { held, watch, .. } =
            std::mem::replace(&mut member.state, MemberState::Live)
        else {
            return;
        };
        let (session_id, last_seq) = (session_id.to_string(), member.delivered);
        let done = if watch {
            ServerFrame::Watching {
                session_id,
                last_seq,
            }
        } else {
            ServerFrame::Resumed {
                session_id,
                last_seq,
            }
        };
        batch.push(ByteString::from(done.to_text()));
        // Answers the replay gave as stored messages: their held tokens are repeats too.
        let stored: HashSet<&str> = held
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::ReplyDone { reply_id, seq } if *seq <= member.delivered => {
                    Some(reply_id.as_str())
                }
                _ => None,
            })
            .collect();
        let mut delivered = member.delivered;
        for event in &held {
            match &event.kind {
                EventKind::Token { reply_id } if stored.contains(reply_id.as_str()) => continue,
                kind => match kind.seq() {
                    Some(seq) if seq <= delivered => continue,
                    Some(seq) => delivered = seq,
                    None => {}
                },
            }
            batch.push(event.text.clone());
        }
        member.delivered = delivered;
        self.push(conn_id, Out::Batch(batch));
    }

    /// The answer in flight in `session_id` is settled: members whose replay waited for it
    /// get the rest of it now.
    fn finish_waiting_replays(&mut self, session_id: &str) {
        let Some(conv) = self.conversations.get_mut(session_id) else {
            return;
        };
        let waiting: Vec<(ConnId, Vec<ByteString>)> = conv
            .members
            .iter_mut()
            .filter_map(|(id, m)| match &mut m.state {
                MemberState::Replaying { last_page, .. } => last_page.take().map(|p| (*id, p)),
                MemberState::Live => None,
            })
            .collect();
        for (conn_id, page) in waiting {
            self.finish_replay(conn_id, session_id, page);
        }
    }
}

impl Handler<Replayed> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Replayed, ctx: &mut Context<Self>) {
        let resume_max = self.resume_max;
        let Some(conv) = self.conversations.get_mut(&msg.session_id) else {
            return;
        };
        let answer_storing = conv
            .reply
            .as_ref()
            .is_some_and(|r| matches!(r.state, ReplyState::Committing));
        let Some(member) = conv.members.get_mut(&msg.conn_id) else {
            return;
        };
        match &mut member.state {
            MemberState::Replaying { replay, .. } if *replay == msg.replay => {}
            MemberState::Replaying { replay, read, .. } => {
                // Stale: a newer resume replaced the one this page was read for. If that
                // one's read waited for this one, it starts now.
                if *read == Read::Queued {
                    *read = Read::InFlight;
                    let (replay, after) = (*replay, member.delivered);
                    self.fetch_replay(msg.conn_id, msg.session_id, replay, after, ctx);
                }
                return;
            }
            MemberState::Live => return,
        }
        let Ok(ReplayPage { messages, last_seq }) = msg.page else {
            member.state = MemberState::Live;
            let frame = ServerFrame::Error {
                code: "resume_failed".into(),
                message: "history could not be read; resume again".into(),
                session_id: Some(msg.session_id.clone()),
                client_id: None,
            };
            self.send_frame(msg.conn_id, &frame);
            return;
        };
        let full_page = messages.len() as i64 >= resume_max;
        let mut batch: Vec<ByteString> = Vec::with_capacity(messages.len() + 1);
        for m in &messages {
            batch.push(ByteString::from(
                ServerFrame::Message(Self::message_view(m)).to_text(),
            ));
            member.delivered = m.seq;
        }
        if messages.is_empty() && member.delivered > last_seq {
            // `after_seq` beyond the end: live events from the real end on must not be
            // taken for ones already seen.
            member.delivered = last_seq;
        }
        if full_page {
            // More may follow: send this page and read the next, still holding live events.
            let after = member.delivered;
            self.push(msg.conn_id, Out::Batch(batch));
            self.fetch_replay(msg.conn_id, msg.session_id, msg.replay, after, ctx);
            return;
        }
        if answer_storing {
            // Whether this page holds the answer being stored is unknown until its store
            // is settled; hold the page until then (`finish_waiting_replays`).
            if let MemberState::Replaying {
                last_page, read, ..
            } = &mut member.state
            {
                *last_page = Some(batch);
                *read = Read::Done;
            }
            return;
        }
        self.finish_replay(msg.conn_id, &msg.session_id, batch);
    }
}

impl Handler<Leave> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        self.leave(msg.conn_id, &msg.session_id);
    }
}

impl SessionManager {
    fn leave(&mut self, conn_id: ConnId, session_id: &str) {
        let peer = self.connections.get_mut(&conn_id).map(|conn| {
            conn.sessions.remove(session_id);
            conn.peer()
        });
        if let (Some(conv), Some(peer)) = (self.conversations.get_mut(session_id), peer) {
            if conv.remove_member(conn_id, &peer) {
                self.announce_presence(session_id, true, None);
            }
        }
        self.tidy(session_id);
    }
}

impl Handler<PostMessage> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: PostMessage, ctx: &mut Context<Self>) {
        if self.draining.is_some() {
            self.settle(msg.origin, Err(AppendFailure::ShuttingDown), ctx);
            // A socket counted this message for a moment before giving it back.
            return self.check_drained();
        }
        self.store(msg.into_append());
    }
}

impl Handler<Committed> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        self.writes.settled(msg.outcomes.len());
        for (origin, outcome) in msg.outcomes {
            self.settle(origin, outcome, ctx);
        }
        self.check_drained();
    }
}

impl Handler<Typing> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Typing, _: &mut Context<Self>) {
        let Some(conn) = self.connections.get(&msg.conn_id) else {
            return;
        };
        let frame = ServerFrame::Typing {
            session_id: msg.session_id.clone(),
            user_id: conn.user_id.clone(),
            role: conn.role.as_str().to_string(),
            active: msg.active,
        };
        let text = ByteString::from(frame.to_text());
        let others: Vec<ConnId> = self
            .conversations
            .get(&msg.session_id)
            .map(|c| {
                c.members
                    .iter()
                    .filter(|(id, m)| **id != msg.conn_id && matches!(m.state, MemberState::Live))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for conn_id in others {
            self.push(conn_id, Out::Frame(text.clone()));
        }
    }
}

impl Handler<StopReply> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: StopReply, ctx: &mut Context<Self>) {
        self.drop_burst(&msg.session_id, ctx);
        if let Some(reply) = self.reply_mut(&msg.session_id, None) {
            if let Some(cancel) = reply.cancel.take() {
                let _ = cancel.send(());
            }
        }
    }
}

impl Handler<TokenChunk> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: TokenChunk, _: &mut Context<Self>) {
        let Some(reply) = self
            .reply_mut(&msg.session_id, Some(&msg.reply_id))
            .filter(|r| matches!(r.state, ReplyState::Streaming))
        else {
            return;
        };
        reply.text.push_str(&msg.delta);
        let frame = ServerFrame::Token {
            session_id: msg.session_id.clone(),
            reply_id: msg.reply_id,
            delta: msg.delta,
        };
        self.broadcast(&msg.session_id, &frame);
    }
}

impl Handler<ReplyFinished> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: ReplyFinished, ctx: &mut Context<Self>) {
        let Some(reply) = self.reply_mut(&msg.session_id, Some(&msg.reply_id)) else {
            return;
        };
        reply.state = ReplyState::Committing;
        reply.cancel = None;
        let text = reply.text.clone();
        if let ReplyOutcome::Failed { code, message } = &msg.outcome {
            let frame = ServerFrame::Error {
                code: code.to_string(),
                message: message.clone(),
                session_id: Some(msg.session_id.clone()),
                client_id: None,
            };
            self.broadcast(&msg.session_id, &frame);
            if *code == AI_UNAVAILABLE {
                log::warn!(
                    "no AI provider can answer in {}; it goes to the human queue",
                    msg.session_id
                );
                self.offer_to_human(&msg.session_id, ctx);
            }
        }
        if text.is_empty() {
            // Nothing was written: there is no answer to store.
            if let Some(conv) = self.conversations.get_mut(&msg.session_id) {
                conv.reply = None;
            }
            self.finish_waiting_replays(&msg.session_id);
            self.tidy(&msg.session_id);
            self.check_drained();
            return;
        }
        let append = Append {
            message: NewMessage {
                session_id: msg.session_id.clone(),
                role: "assistant",
                author_id: None,
                content: text,
                client_id: None,
                interrupted: msg.outcome != ReplyOutcome::Complete,
                model: msg.model,
                tokens: msg.tokens,
            },
            origin: Origin::Reply {
                session_id: msg.session_id.clone(),
                reply_id: msg.reply_id,
            },
        };
        self.store(append);
    }
}
