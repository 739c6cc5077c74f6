//! SessionManager: the live state of this node, and the router of every conversation event.
//!
//! One per node, on the system arbiter. It owns the connections (their bounded outboxes),
//! which connection is in which conversation, each connection's resume state, and the AI
//! answer in flight per conversation. WsSession actors and HTTP handlers talk to it; it hands
//! writes to the Committer, answers to the InferencePool, and history reads to the persistence
//! actor. It does not authenticate, rate-limit or call providers: those live elsewhere.
//! It decides when a conversation gets an AI turn: a customer's burst of messages becomes one
//! turn (`AI_BATCH_SIZE`, `AI_BATCH_TIMEOUT`), and a conversation the AI cannot answer is
//! offered to a human (`offer_to_human`).
//!
//! Every event is serialised once and the same bytes are queued for every recipient. A
//! recipient whose queue is full is a slow consumer: it is dropped and told so, and nobody
//! else waits for it.

pub mod messages;

use std::collections::{HashMap, HashSet};
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
use crate::db::models::{serialize_time_string, Appended, ChatMessage, NewMessage, Role};
use crate::protocol::{MessageView, Peer, ServerFrame};

/// One queued event with what the router needs to know about it.
#[derive(Clone)]
struct Event {
    text: ByteString,
    /// The stored message this event shows, if any (`message`, `reply_done`).
    seq: Option<i64>,
    /// Only `message` frames are dropped when a replay already delivered them.
    is_message: bool,
}

enum MemberState {
    /// Waiting for the replay of stored messages; live events are held here meanwhile.
    Replaying {
        held: Vec<Event>,
    },
    Live,
}

struct Member {
    state: MemberState,
    /// Highest seq delivered to this member as a `message`; later copies are skipped.
    delivered: i64,
}

struct Connection {
    user_id: String,
    role: Role,
    outbox: Outbox,
    kick: Recipient<Kick>,
    sessions: HashSet<String>,
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
    reply: Option<LiveReply>,
    /// A customer wrote while an answer was in flight: answer again when it is stored.
    turn_pending: bool,
    burst: Option<Burst>,
}

pub struct SessionManager {
    db: Db,
    inference: InferencePool,
    committer: Addr<Committer>,
    resume_max: i64,
    /// Events held for one replaying member before it counts as a slow consumer.
    held_max: usize,
    coalescing: Coalescing,
    connections: HashMap<ConnId, Connection>,
    conversations: HashMap<String, Conversation>,
}

impl SessionManager {
    /// Starts the manager and its committer.
    pub fn start(
        db: Db,
        inference: InferencePool,
        batch_max: usize,
        resume_max: i64,
        held_max: usize,
        coalescing: Coalescing,
    ) -> Addr<SessionManager> {
        SessionManager::create(move |ctx| SessionManager {
            committer: Committer::new(db.clone(), batch_max, ctx.address().recipient()).start(),
            db,
            inference,
            resume_max: resume_max.max(1),
            held_max: held_max.max(1),
            coalescing,
            connections: HashMap::new(),
            conversations: HashMap::new(),
        })
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
        for session_id in conn.sessions {
            if let Some(conv) = self.conversations.get_mut(&session_id) {
                conv.members.remove(&conn_id);
            }
            self.announce_presence(&session_id);
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
    fn broadcast(&mut self, session_id: &str, frame: &ServerFrame, seq: Option<i64>) {
        let event = Event {
            text: ByteString::from(frame.to_text()),
            seq,
            is_message: matches!(frame, ServerFrame::Message(_)),
        };
        let Some(conv) = self.conversations.get_mut(session_id) else {
            return;
        };
        let mut deliver = Vec::new();
        let mut overflowing = Vec::new();
        for (conn_id, member) in conv.members.iter_mut() {
            match &mut member.state {
                MemberState::Replaying { held } if held.len() >= self.held_max => {
                    overflowing.push(*conn_id)
                }
                MemberState::Replaying { held } => held.push(event.clone()),
                MemberState::Live => {
                    if event.is_message {
                        let s = seq.unwrap_or(0);
                        if s <= member.delivered {
                            continue;
                        }
                        member.delivered = s;
                    }
                    deliver.push(*conn_id);
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

    fn announce_presence(&mut self, session_id: &str) {
        let Some(conv) = self.conversations.get(session_id) else {
            return;
        };
        let mut members: Vec<Peer> = conv
            .members
            .keys()
            .filter_map(|id| self.connections.get(id))
            .map(|c| Peer {
                user_id: c.user_id.clone(),
                role: c.role.as_str().to_string(),
            })
            .collect();
        members.sort();
        members.dedup();
        let frame = ServerFrame::Presence {
            session_id: session_id.to_string(),
            members,
        };
        self.broadcast(session_id, &frame, None);
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
        if pause.is_zero() {
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
                    Asked {
                        appended,
                        earlier_reply,
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
        self.broadcast(
            &m.session_id,
            &ServerFrame::Message(Self::message_view(m)),
            Some(m.seq),
        );
        if m.role == "user" {
            self.customer_wrote(&m.session_id.clone(), ctx);
        }
    }

    /// The AI cannot go on in a conversation: offer it to a human agent. For now this tells
    /// everyone in the conversation (agents watching it included) and logs; the human queue
    /// takes the conversation from here.
    fn offer_to_human(&mut self, session_id: &str, reason: &str) {
        log::warn!("conversation {session_id} is offered to a human agent: {reason}");
        let frame = ServerFrame::HumanOffered {
            session_id: session_id.to_string(),
            reason: reason.to_string(),
        };
        self.broadcast(session_id, &frame, None);
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
        match outcome {
            Ok(appended) => {
                let m = &appended.message;
                let frame = ServerFrame::ReplyDone {
                    session_id: session_id.clone(),
                    reply_id: reply_id.to_string(),
                    seq: m.seq,
                    interrupted: m.interrupted,
                };
                self.broadcast(&session_id, &frame, Some(m.seq));
            }
            Err(failure) => {
                log::error!(
                    "the AI answer {reply_id} in {session_id} could not be stored: {failure:?}"
                );
                let frame = Self::failure_frame(&session_id, None, &failure);
                self.broadcast(&session_id, &frame, None);
            }
        }
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

impl Handler<Connect> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) {
        self.connections.insert(
            msg.conn_id,
            Connection {
                user_id: msg.user_id,
                role: msg.role,
                outbox: msg.outbox,
                kick: msg.kick,
                sessions: HashSet::new(),
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
        let Join {
            conn_id,
            session_id,
            after_seq,
        } = msg;
        let Some(conn) = self.connections.get_mut(&conn_id) else {
            return;
        };
        let newly_joined = conn.sessions.insert(session_id.clone());
        let conv = self.conversations.entry(session_id.clone()).or_default();
        if !newly_joined && after_seq.is_none() {
            return;
        }
        let Some(after_seq) = after_seq else {
            conv.members.insert(
                conn_id,
                Member {
                    state: MemberState::Live,
                    delivered: 0,
                },
            );
            self.announce_presence(&session_id);
            return;
        };
        let mut held = Vec::new();
        // An answer being written: the joiner first gets what was written so far.
        if let Some(reply) = conv.reply.as_ref().filter(|r| !r.text.is_empty()) {
            let frame = ServerFrame::Token {
                session_id: session_id.clone(),
                reply_id: reply.reply_id.clone(),
                delta: reply.text.clone(),
            };
            held.push(Event {
                text: ByteString::from(frame.to_text()),
                seq: None,
                is_message: false,
            });
        }
        conv.members.insert(
            conn_id,
            Member {
                state: MemberState::Replaying { held },
                delivered: after_seq,
            },
        );
        if newly_joined {
            self.announce_presence(&session_id);
        }
        self.fetch_replay(conn_id, session_id, after_seq, ctx);
    }
}

impl SessionManager {
    /// Reads the next page of stored messages for a replaying member.
    fn fetch_replay(
        &self,
        conn_id: ConnId,
        session_id: String,
        after: i64,
        ctx: &mut Context<Self>,
    ) {
        let db = self.db.clone();
        let limit = self.resume_max;
        let me = ctx.address();
        actix::spawn(async move {
            let sid = session_id.clone();
            let messages = db
                .run(move |c| Ok(message::page(c, &sid, Order::Asc, Some(after), limit)?))
                .await
                .map_err(|e| log::error!("replaying {session_id} failed: {e}"));
            me.do_send(Replayed {
                conn_id,
                session_id,
                after,
                messages,
            });
        });
    }
}

impl Handler<Replayed> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Replayed, ctx: &mut Context<Self>) {
        let resume_max = self.resume_max;
        let Some(member) = self
            .conversations
            .get_mut(&msg.session_id)
            .and_then(|c| c.members.get_mut(&msg.conn_id))
        else {
            return;
        };
        if !matches!(member.state, MemberState::Replaying { .. }) || member.delivered != msg.after {
            return; // stale: a newer resume replaced this one
        }
        let Ok(messages) = msg.messages else {
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
        if full_page {
            // More may follow: send this page and read the next, still holding live events.
            let after = member.delivered;
            self.push(msg.conn_id, Out::Batch(batch));
            self.fetch_replay(msg.conn_id, msg.session_id, after, ctx);
            return;
        }
        let MemberState::Replaying { held } =
            std::mem::replace(&mut member.state, MemberState::Live)
        else {
            return;
        };
        batch.push(ByteString::from(
            ServerFrame::Resumed {
                session_id: msg.session_id.clone(),
                last_seq: member.delivered,
            }
            .to_text(),
        ));
        for event in held {
            if event.is_message {
                // Held while replaying: skip what the replay already gave.
                match event.seq {
                    Some(s) if s <= member.delivered => continue,
                    Some(s) => member.delivered = s,
                    None => {}
                }
            }
            batch.push(event.text);
        }
        self.push(msg.conn_id, Out::Batch(batch));
    }
}

impl Handler<Leave> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        if let Some(conn) = self.connections.get_mut(&msg.conn_id) {
            conn.sessions.remove(&msg.session_id);
        }
        if let Some(conv) = self.conversations.get_mut(&msg.session_id) {
            if conv.members.remove(&msg.conn_id).is_some() {
                self.announce_presence(&msg.session_id);
            }
        }
        self.tidy(&msg.session_id);
    }
}

impl Handler<PostMessage> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: PostMessage, _: &mut Context<Self>) {
        let role = if msg.role.is_staff() { "agent" } else { "user" };
        let append = Append {
            message: NewMessage {
                session_id: msg.session_id,
                role,
                author_id: Some(msg.author_id),
                content: msg.content,
                client_id: msg.client_id,
                interrupted: false,
                model: None,
                tokens: None,
            },
            origin: msg.origin,
        };
        self.committer.do_send(append);
    }
}

impl Handler<Committed> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        for (origin, outcome) in msg.outcomes {
            self.settle(origin, outcome, ctx);
        }
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
        self.broadcast(&msg.session_id, &frame, None);
    }
}

impl Handler<ReplyFinished> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: ReplyFinished, _: &mut Context<Self>) {
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
            self.broadcast(&msg.session_id, &frame, None);
            if *code == AI_UNAVAILABLE {
                self.offer_to_human(&msg.session_id, code);
            }
        }
        if text.is_empty() {
            // Nothing was written: there is no answer to store.
            if let Some(conv) = self.conversations.get_mut(&msg.session_id) {
                conv.reply = None;
            }
            self.tidy(&msg.session_id);
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
        self.committer.do_send(append);
    }
}
