//! The agent desk's live state, kept by the SessionManager: which sockets are dashboards,
//! which conversations the AI must leave alone (taken over, or waiting for a human), the
//! timers of the human queue, and which conversations changed since the dashboards were last
//! told. The stored truth (mode, assigned agent, `human_requested_at`) is in `chat_sessions`;
//! every change goes through a conditional UPDATE there first, so agents on several nodes
//! cannot both win a takeover.
//!
//! Dashboard updates are gathered and sent together every [`FLUSH_EVERY`]: one read of the
//! changed conversations' summaries however many events touched them. A conversation changed
//! only by new messages is not read again: the messages are applied to the summary the desk
//! read last; one read more than [`KNOWN_FOR`] ago is read again before it is sent
//! ([`Desk::message_stored`], [`Desk::take_patched`]). Someone coming or going is sent the
//! same way ([`Desk::presence_changed`]). Of the conversations new or changed only in these
//! ways, a flush sends the held ones and the newest that a dashboard lists, whether their
//! summaries were held or read ([`keep_newest`]).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::NaiveDateTime;

use super::messages::*;
use super::{Census, SessionManager};
use crate::actors::persistence::DbError;
use crate::db::models::desk::{self, LastMessage, Refused, Summary, PREVIEW_CHARS};
use crate::db::models::session::{self, StatusChange, ACTIVE, MODE_HUMAN};
use crate::db::models::{serialize_time_string, ChatMessage, ChatSession, Role};
use crate::protocol::{AgentView, CustomerView, LastMessageView, ServerFrame, SessionSummary};

/// How often changed conversations are sent to the dashboards.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// The most summaries the desk keeps for applying new messages to; past it, it starts again.
const KNOWN_MAX: usize = 50_000;
/// How long a summary read is sent with new messages applied to it; older, it is read again
/// before it is sent. Another node's changes reach this node's dashboards with that read, so
/// at most this late in a conversation the dashboards are sent.
const KNOWN_FOR: Duration = Duration::from_secs(10);
/// When ending a wait for a human could not be stored, the next try comes this much later.
const RETRY_WAIT_OVER: Duration = Duration::from_secs(5);

/// Why the AI must not answer in a conversation now.
#[derive(Debug, Clone, PartialEq)]
enum Hold {
    /// An agent took it over.
    Human,
    /// The customer asked for a human at this time and is waiting.
    Queued(NaiveDateTime),
}

/// Whom a conversation waits for instead of the AI, as the AI endpoints report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HumanHold {
    /// An agent has taken it over and answers.
    TakenOver,
    /// It is in the human queue.
    Queued,
}

impl HumanHold {
    pub fn as_str(self) -> &'static str {
        match self {
            HumanHold::TakenOver => "taken_over",
            HumanHold::Queued => "queued",
        }
    }
}

/// What the desk starts with.
#[derive(Clone)]
pub struct DeskSettings {
    pub human_wait: Duration,
    pub snapshot_max: i64,
    pub restore_window: chrono::Duration,
    /// Conversations taken over or waiting for a human when the node starts (read before it
    /// accepts connections, so that its AI never answers in them).
    pub held_at_start: Vec<ChatSession>,
}

pub struct Desk {
    settings: DeskSettings,
    /// Dashboard sockets and who is behind each.
    staff: HashMap<ConnId, AgentView>,
    /// Who is online, with their number of dashboards: `agents_online` goes out only when
    /// someone comes or goes, not when an agent opens a second tab.
    online: Census<AgentView>,
    /// Dashboards whose snapshot is being read: the snapshot is their first desk frame, so
    /// updates skip them until it is sent.
    awaiting_snapshot: HashSet<ConnId>,
    held: HashMap<String, Hold>,
    timers: HashMap<String, SpawnHandle>,
    /// Waiting for a human, a customer wrote and the AI kept silent: answer when the wait ends.
    missed: HashSet<String>,
    /// Conversations changed since the last flush, to be read again.
    dirty: HashSet<String>,
    /// Of `dirty`, those new or changed only by new messages or by someone coming or going
    /// (no summary of them was held, or it was held too long): like `patched`, only the
    /// newest of them go out.
    light: HashSet<String>,
    queue_dirty: bool,
    /// The summaries read by the flushes while dashboards were open, by conversation, and
    /// when each was read. Kept only while every change is tracked: emptied when the last
    /// dashboard closes, and each read again before it is sent once older than [`KNOWN_FOR`].
    known: HashMap<String, (Summary, Instant)>,
    /// Conversations changed since the last flush only by new messages (applied in `known`)
    /// or by someone coming or going (worked out when the summary is sent), each with its
    /// summary's `updated_at`: a flush chooses the newest of them by it, and looks up only the
    /// summaries it sends. None of them is in `dirty`.
    patched: HashMap<String, NaiveDateTime>,
    /// Conversations a flush is reading now. A message stored meanwhile may be missing from
    /// what it reads, so it is left to the next read, which starts after its commit.
    reading: HashSet<String>,
    /// Counts the times `known` was emptied: a read started before that is not kept.
    known_epoch: u64,
}

impl Desk {
    pub fn new(settings: DeskSettings) -> Desk {
        Desk {
            settings,
            staff: HashMap::new(),
            online: Census::default(),
            awaiting_snapshot: HashSet::new(),
            held: HashMap::new(),
            timers: HashMap::new(),
            missed: HashSet::new(),
            dirty: HashSet::new(),
            light: HashSet::new(),
            queue_dirty: false,
            known: HashMap::new(),
            patched: HashMap::new(),
            reading: HashSet::new(),
            known_epoch: 0,
        }
    }

    /// True when the AI must stay silent in the conversation. A turn skipped while the
    /// customer waits for a human is remembered, to be answered if nobody comes.
    pub fn ai_silent(&mut self, session_id: &str) -> bool {
        match self.held.get(session_id) {
            None => false,
            Some(Hold::Human) => true,
            Some(Hold::Queued(_)) => {
                self.missed.insert(session_id.to_string());
                true
            }
        }
    }

    /// Whether an agent or the human queue has the conversation (the AI is silent there).
    pub fn human_hold(&self, session_id: &str) -> Option<HumanHold> {
        match self.held.get(session_id)? {
            Hold::Human => Some(HumanHold::TakenOver),
            Hold::Queued(_) => Some(HumanHold::Queued),
        }
    }

    /// Marks a conversation as changed, for the next flush to read and send to the dashboards.
    pub fn touch(&mut self, session_id: &str) {
        if !self.staff.is_empty() {
            self.dirty.insert(session_id.to_string());
            self.light.remove(session_id);
            self.patched.remove(session_id);
        }
    }

    /// Marks a conversation new or changed only by new messages or presence, to be read at
    /// the next flush (unless it is marked changed already, by those or otherwise).
    fn read_light(&mut self, session_id: String) {
        self.patched.remove(&session_id);
        if self.dirty.insert(session_id.clone()) {
            self.light.insert(session_id);
        }
    }

    /// Forgets what was to be read at the next flush.
    fn clear_dirty(&mut self) {
        self.dirty.clear();
        self.light.clear();
        self.queue_dirty = false;
    }

    /// A new message was stored: it is applied to the conversation's summary when the desk
    /// holds one that nothing else has changed since, else the next flush reads the
    /// conversation again. (A summary read more than [`KNOWN_FOR`] ago is applied to as well,
    /// which keeps its place among the newest right, and read again if it is to be sent.)
    pub fn message_stored(&mut self, m: &ChatMessage) {
        let Some(summary) = self.summary_to_patch(&m.session_id) else {
            return;
        };
        if m.seq <= summary.session.last_seq {
            return;
        }
        summary.session.last_seq = m.seq;
        summary.session.updated_at = m.created_at;
        summary.last_message = Some(LastMessage {
            seq: m.seq,
            role: m.role.clone(),
            content: m.content.chars().take(PREVIEW_CHARS).collect(),
            created_at: m.created_at,
        });
        // The oldest customer message no one has answered since (see `desk::summaries`).
        match m.role.as_str() {
            "user" => {
                summary.waiting_since.get_or_insert(m.created_at);
            }
            "assistant" | "agent" => summary.waiting_since = None,
            _ => {}
        }
        self.patched.insert(m.session_id.clone(), m.created_at);
    }

    /// A conversation was created: it is read at the next flush, and sent if it is among
    /// the newest (it is, unless many conversations changed at once).
    pub fn created(&mut self, session_id: String) {
        if !self.staff.is_empty() {
            self.read_light(session_id);
        }
    }

    /// Someone came into a conversation or left it. What a summary shows of that (whether the
    /// customer is online) is worked out when it is sent, so the summary held is sent as after
    /// a new message: when it is among the newest, or held. One not held is read.
    pub fn presence_changed(&mut self, session_id: &str) {
        if let Some(summary) = self.summary_to_patch(session_id) {
            let updated_at = summary.session.updated_at;
            self.patched.insert(session_id.to_string(), updated_at);
        }
    }

    /// The summary held of a conversation changed only by new messages or presence, for the
    /// change to be sent from. `None` when no dashboard is open, when the conversation is to
    /// be read anyway, or when no summary of it can be used (being read, or none held): it is
    /// then read at the next flush.
    fn summary_to_patch(&mut self, session_id: &str) -> Option<&mut Summary> {
        if self.staff.is_empty() || self.dirty.contains(session_id) {
            return None;
        }
        if self.reading.contains(session_id) || !self.known.contains_key(session_id) {
            self.read_light(session_id.to_string());
            return None;
        }
        self.known.get_mut(session_id).map(|(summary, _)| summary)
    }

    /// The conversations changed since the last flush only by new messages or presence that
    /// go to the dashboards now: every one an agent has taken over or a customer waits in,
    /// and of the others the newest [`DeskSettings::snapshot_max`]. A dashboard lists that
    /// many live conversations, the most recently changed first (its snapshot is those), so
    /// an older one would fall below its list; the summary held stays up to date, and goes
    /// out when the conversation is among the newest again or changes in another way. Those
    /// whose summary was read more than [`KNOWN_FOR`] ago are left to this flush's read
    /// instead, so that a change made on another node shows.
    fn take_patched(&mut self) -> Vec<Summary> {
        let patched = std::mem::take(&mut self.patched);
        let (held, mut others): (Vec<_>, Vec<_>) = patched
            .iter()
            .partition(|(id, _)| self.held.contains_key(id.as_str()));
        keep_newest(&mut others, self.list_max(), |(id, updated_at)| {
            (**updated_at, id.as_str())
        });
        let mut send = Vec::with_capacity(held.len() + others.len());
        let mut read_again = Vec::new();
        for (id, _) in held.into_iter().chain(others) {
            let Some((summary, read_at)) = self.known.get(id) else {
                continue;
            };
            if read_at.elapsed() < KNOWN_FOR {
                send.push(summary.clone());
            } else {
                read_again.push(id.clone());
            }
        }
        for id in read_again {
            self.read_light(id);
        }
        send
    }

    /// How many live conversations a dashboard lists.
    fn list_max(&self) -> usize {
        usize::try_from(self.settings.snapshot_max).unwrap_or(usize::MAX)
    }

    /// Of summaries read, the ones a flush sends: of those in `light` and not held (taken over
    /// or queued), the newest [`Desk::list_max`], as [`Desk::take_patched`] chooses from the
    /// summaries held; every other one.
    fn to_send(&self, read: Vec<Summary>, light: &HashSet<String>) -> Vec<Summary> {
        let (mut newest, mut send): (Vec<Summary>, Vec<Summary>) = read
            .into_iter()
            .partition(|s| light.contains(&s.session.id) && !self.held.contains_key(&s.session.id));
        keep_newest(&mut newest, self.list_max(), |s| {
            (s.session.updated_at, s.session.id.as_str())
        });
        send.append(&mut newest);
        send
    }

    /// Forgets every summary held (a change made while no dashboard was open was not
    /// tracked); the conversations waiting to be sent from them are read again.
    fn forget_known(&mut self) {
        self.known.clear();
        for (id, _) in std::mem::take(&mut self.patched) {
            self.read_light(id);
        }
        self.known_epoch += 1;
    }

    fn agents_online(&self) -> Vec<AgentView> {
        self.online.list()
    }

    /// A dashboard opened; true when its agent was not online before.
    fn add_dashboard(&mut self, conn_id: ConnId, agent: AgentView) -> bool {
        if self.staff.contains_key(&conn_id) {
            return false;
        }
        self.staff.insert(conn_id, agent.clone());
        self.online.add(agent)
    }

    /// A dashboard closed; true when that was its agent's last one.
    fn remove_dashboard(&mut self, conn_id: ConnId) -> bool {
        let Some(agent) = self.staff.remove(&conn_id) else {
            return false;
        };
        if self.staff.is_empty() {
            self.forget_known();
        }
        self.online.remove(&agent)
    }
}

/// Keeps the newest `n` of `items`, in no particular order. `changed` gives a conversation's
/// `updated_at` and id: newest first is the snapshot's order (`desk::active_ids`).
fn keep_newest<T>(items: &mut Vec<T>, n: usize, changed: impl Fn(&T) -> (NaiveDateTime, &str)) {
    if items.len() > n {
        items.select_nth_unstable_by(n, |a, b| changed(b).cmp(&changed(a)));
        items.truncate(n);
    }
}

/// Starts the desk's timers and holds the AI back in the conversations read at start.
pub fn start(manager: &mut SessionManager, ctx: &mut Context<SessionManager>) {
    ctx.run_interval(FLUSH_EVERY, |act, ctx| act.desk_flush(ctx));
    for s in std::mem::take(&mut manager.desk.settings.held_at_start) {
        if s.mode == MODE_HUMAN {
            manager.desk.held.insert(s.id, Hold::Human);
        } else if let Some(since) = s.human_requested_at {
            manager.hold_queued(&s.id, since, ctx);
        }
    }
}

impl SessionManager {
    /// Shutting down: the human queue's timers stop (the waits are stored, and the node that
    /// starts next picks them up with the time they have left).
    pub(super) fn desk_drain(&mut self, ctx: &mut Context<Self>) {
        for (_, timer) in self.desk.timers.drain() {
            ctx.cancel_future(timer);
        }
    }

    /// Every socket was closed: no dashboard is left to tell anything.
    pub(super) fn desk_closed(&mut self) {
        self.desk.staff.clear();
        self.desk.online.clear();
        self.desk.awaiting_snapshot.clear();
        self.desk.forget_known();
        self.desk.clear_dirty();
    }

    /// A socket closed: if it was a dashboard, the others learn who is still online.
    pub(super) fn desk_forget(&mut self, conn_id: ConnId) {
        self.desk.awaiting_snapshot.remove(&conn_id);
        if self.desk.remove_dashboard(conn_id) {
            self.send_agents_online();
        }
    }

    fn send_agents_online(&mut self) {
        let frame = ServerFrame::AgentsOnline {
            agents: self.desk.agents_online(),
        };
        self.tell_staff(&frame);
    }

    fn tell_staff(&mut self, frame: &ServerFrame) {
        let text = bytestring::ByteString::from(frame.to_text());
        let conns: Vec<ConnId> = self
            .desk
            .staff
            .keys()
            .copied()
            .filter(|id| !self.desk.awaiting_snapshot.contains(id))
            .collect();
        for conn_id in conns {
            self.push(conn_id, Out::Frame(text.clone()));
        }
    }

    fn refuse(&mut self, conn_id: ConnId, session_id: &str, code: &str, message: &str) {
        let frame = ServerFrame::Error {
            code: code.into(),
            message: message.into(),
            session_id: Some(session_id.to_string()),
            client_id: None,
        };
        self.send_frame(conn_id, &frame);
    }

    fn refuse_db(&mut self, conn_id: ConnId, session_id: &str, e: &DbError) {
        log::error!("a desk change of {session_id} failed: {e}");
        self.refuse(
            conn_id,
            session_id,
            "unavailable",
            "the change could not be made now; try again",
        );
    }

    /// Whether the customer of a conversation is in it on this node now.
    fn customer_online(&self, session_id: &str, customer_id: &str) -> bool {
        self.conversations.get(session_id).is_some_and(|c| {
            c.members.keys().any(|id| {
                self.connections
                    .get(id)
                    .is_some_and(|conn| conn.user_id == customer_id && !conn.role.is_staff())
            })
        })
    }

    fn summary_view(&self, s: Summary) -> SessionSummary {
        let online = self.customer_online(&s.session.id, &s.session.user_id);
        let ChatSession {
            id,
            user_id,
            title,
            status,
            mode,
            assigned_agent_id,
            last_seq,
            updated_at,
            human_requested_at,
            ..
        } = s.session;
        SessionSummary {
            session_id: id,
            title,
            customer: CustomerView {
                user_id,
                email: s.customer_email,
                online,
            },
            status,
            mode,
            assigned_agent: assigned_agent_id.map(|user_id| AgentView {
                user_id,
                email: s.agent_email.unwrap_or_default(),
            }),
            human_requested_at: human_requested_at.as_ref().map(serialize_time_string),
            waiting_since: s.waiting_since.as_ref().map(serialize_time_string),
            last_message: s.last_message.map(|m| LastMessageView {
                seq: m.seq,
                role: m.role,
                content: m.content,
                created_at: serialize_time_string(&m.created_at),
            }),
            last_seq,
            updated_at: serialize_time_string(&updated_at),
        }
    }

    /// Sends the dashboards what changed since the last flush: at once the conversations
    /// changed only by new messages, from the summaries held, then the others, read again.
    /// (The held ones go first so that a slow read cannot bring an older state of one after a
    /// newer one; none of them is being read.)
    fn desk_flush(&mut self, ctx: &mut Context<Self>) {
        if self.desk.staff.is_empty() {
            self.desk.clear_dirty();
            return;
        }
        let patched = self.desk.take_patched();
        self.send_updates(patched);
        let desk = &mut self.desk;
        if desk.dirty.is_empty() && !desk.queue_dirty {
            return;
        }
        let ids: Vec<String> = desk.dirty.drain().collect();
        let light = std::mem::take(&mut desk.light);
        desk.reading.extend(ids.iter().cloned());
        let with_queue = std::mem::take(&mut desk.queue_dirty);
        let max = desk.settings.snapshot_max;
        let epoch = desk.known_epoch;
        let read_at = Instant::now();
        let db = self.db.clone();
        let read_ids = ids.clone();
        let read = async move {
            db.run(move |c| {
                let changed = desk::summaries(c, &read_ids)?;
                let queue = if with_queue {
                    let queued = desk::queue_ids(c, max)?;
                    Some(desk::summaries(c, &queued)?)
                } else {
                    None
                };
                Ok((changed, queue))
            })
            .await
        };
        ctx.spawn(read.into_actor(self).map(move |read, act, _| {
            let desk = &mut act.desk;
            for id in &ids {
                desk.reading.remove(id);
            }
            let (changed, queue) = match read {
                Ok(read) => read,
                Err(e) => {
                    log::error!("reading conversation summaries for the desk failed: {e}");
                    // Read again at the next flush.
                    for id in ids {
                        if light.contains(&id) {
                            desk.read_light(id);
                        } else {
                            desk.touch(&id);
                        }
                    }
                    return;
                }
            };
            if epoch == desk.known_epoch {
                if desk.known.len() + changed.len() > KNOWN_MAX {
                    desk.forget_known();
                }
                for s in &changed {
                    desk.known
                        .insert(s.session.id.clone(), (s.clone(), read_at));
                }
            }
            let send = desk.to_send(changed, &light);
            act.send_updates(send);
            if let Some(queue) = queue {
                let sessions = queue.into_iter().map(|s| act.summary_view(s)).collect();
                act.tell_staff(&ServerFrame::Queue { sessions });
            }
        }));
    }

    /// One `session_updates` frame for all these conversations: each dashboard costs a frame
    /// or two per flush, however many changed.
    fn send_updates(&mut self, changed: Vec<Summary>) {
        if changed.is_empty() {
            return;
        }
        let sessions = changed.into_iter().map(|s| self.summary_view(s)).collect();
        self.tell_staff(&ServerFrame::SessionUpdates { sessions });
    }

    /// Cancels the AI answer in flight in a conversation and any turn waiting for it: a
    /// follow-up turn, or a burst of customer messages waiting for its pause to end.
    fn silence_ai(&mut self, session_id: &str, ctx: &mut Context<Self>) {
        if let Some(conv) = self.conversations.get_mut(session_id) {
            conv.turn_pending = false;
            if let Some(cancel) = conv.reply.as_mut().and_then(|r| r.cancel.take()) {
                let _ = cancel.send(());
            }
        }
        self.drop_burst(session_id, ctx);
    }

    fn hold_queued(&mut self, session_id: &str, since: NaiveDateTime, ctx: &mut Context<Self>) {
        if self.desk.held.get(session_id) == Some(&Hold::Queued(since)) {
            return;
        }
        self.desk
            .held
            .insert(session_id.to_string(), Hold::Queued(since));
        if self.draining.is_some() {
            return; // the node that starts next times the wait
        }
        let waited = (crate::db::models::now() - since)
            .to_std()
            .unwrap_or_default();
        let left = self.desk.settings.human_wait.saturating_sub(waited);
        let sid = session_id.to_string();
        let timer = ctx.run_later(left, move |act, ctx| act.human_wait_over(sid, since, ctx));
        if let Some(old) = self.desk.timers.insert(session_id.to_string(), timer) {
            ctx.cancel_future(old);
        }
    }

    fn unhold(&mut self, session_id: &str, ctx: &mut Context<Self>) {
        self.desk.held.remove(session_id);
        self.desk.missed.remove(session_id);
        if let Some(timer) = self.desk.timers.remove(session_id) {
            ctx.cancel_future(timer);
        }
    }

    /// Nobody took the conversation in time: the customer is told, and the AI answers what
    /// is still unanswered.
    fn human_wait_over(
        &mut self,
        session_id: String,
        since: NaiveDateTime,
        ctx: &mut Context<Self>,
    ) {
        self.desk.timers.remove(&session_id);
        let db = self.db.clone();
        let sid = session_id.clone();
        let work = async move {
            db.run(move |c| {
                let over = desk::human_wait_over(c, &sid, since)?;
                let unanswered = desk::summaries(c, std::slice::from_ref(&sid))?
                    .pop()
                    .is_some_and(|s| s.waiting_since.is_some());
                Ok((over, unanswered))
            })
            .await
        };
        ctx.spawn(work.into_actor(self).map(move |done, act, ctx| {
            let (over, unanswered) = match done {
                Ok(done) => done,
                Err(e) => {
                    log::error!(
                        "ending the wait for a human in {session_id} failed: {e}; trying again"
                    );
                    if act.desk.held.get(&session_id) == Some(&Hold::Queued(since)) {
                        let sid = session_id.clone();
                        let timer = ctx.run_later(RETRY_WAIT_OVER, move |act, ctx| {
                            act.human_wait_over(sid, since, ctx)
                        });
                        act.desk.timers.insert(session_id, timer);
                    }
                    return;
                }
            };
            if act.desk.held.get(&session_id) != Some(&Hold::Queued(since)) {
                return; // taken over, closed or asked again meanwhile
            }
            act.desk.held.remove(&session_id);
            let missed = act.desk.missed.remove(&session_id);
            if !over {
                return; // the stored request changed elsewhere; it holds no longer here
            }
            let frame = ServerFrame::HumanUnavailable {
                session_id: session_id.clone(),
            };
            act.broadcast(&session_id, &frame);
            act.desk.touch(&session_id);
            act.desk.queue_dirty = true;
            if unanswered || missed {
                act.start_reply(&session_id, ctx);
            }
        }));
    }

    fn takeover(&mut self, cmd: DeskCommand, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let (sid, agent_id) = (cmd.session_id.clone(), cmd.user.user_id.clone());
        let work = async move {
            db.run(move |c| Ok(desk::take_over(c, &sid, &agent_id)?))
                .await
        };
        ctx.spawn(work.into_actor(self).map(move |done, act, ctx| {
            let sid = cmd.session_id;
            match done {
                Err(e) => act.refuse_db(cmd.conn_id, &sid, &e),
                Ok(Err(refused)) => act.refuse_change(cmd.conn_id, &sid, &refused),
                Ok(Ok(_)) => {
                    act.unhold(&sid, ctx);
                    act.desk.held.insert(sid.clone(), Hold::Human);
                    act.silence_ai(&sid, ctx);
                    if !act.is_member(cmd.conn_id, &sid) {
                        act.join(cmd.conn_id, sid.clone(), Some(0), true, ctx);
                    }
                    let frame = ServerFrame::Mode {
                        session_id: sid.clone(),
                        mode: MODE_HUMAN.into(),
                        agent: Some(cmd.user),
                    };
                    act.broadcast(&sid, &frame);
                    act.desk.touch(&sid);
                    act.desk.queue_dirty = true;
                }
            }
        }));
    }

    fn release(&mut self, cmd: DeskCommand, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let (sid, agent_id) = (cmd.session_id.clone(), cmd.user.user_id.clone());
        let any_agent = cmd.role == Role::Admin;
        let work = async move {
            db.run(move |c| Ok(desk::release(c, &sid, &agent_id, any_agent)?))
                .await
        };
        ctx.spawn(work.into_actor(self).map(move |done, act, ctx| {
            let sid = cmd.session_id;
            match done {
                Err(e) => act.refuse_db(cmd.conn_id, &sid, &e),
                Ok(Err(refused)) => act.refuse_change(cmd.conn_id, &sid, &refused),
                Ok(Ok(s)) => {
                    act.unhold(&sid, ctx);
                    let frame = ServerFrame::Mode {
                        session_id: sid.clone(),
                        mode: s.mode,
                        agent: None,
                    };
                    act.broadcast(&sid, &frame);
                    act.desk.touch(&sid);
                }
            }
        }));
    }

    fn request_human(&mut self, cmd: DeskCommand, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let sid = cmd.session_id.clone();
        let work = async move { db.run(move |c| Ok(desk::request_human(c, &sid)?)).await };
        ctx.spawn(work.into_actor(self).map(move |done, act, ctx| {
            let sid = cmd.session_id;
            match done {
                Err(e) => act.refuse_db(cmd.conn_id, &sid, &e),
                Ok(Err(refused)) => act.refuse_change(cmd.conn_id, &sid, &refused),
                Ok(Ok(s)) => {
                    if !act.is_member(cmd.conn_id, &sid) {
                        act.join(cmd.conn_id, sid.clone(), None, false, ctx);
                    }
                    act.queued(&s, ctx);
                }
            }
        }));
    }

    /// Puts a conversation in the human queue on the server's own initiative (for one that no
    /// AI provider can answer): its members get `human_requested` as if the customer had asked,
    /// and the dashboards see it queued.
    pub fn offer_to_human(&mut self, session_id: &str, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let sid = session_id.to_string();
        let work = async move { db.run(move |c| Ok(desk::request_human(c, &sid)?)).await };
        let sid = session_id.to_string();
        ctx.spawn(work.into_actor(self).map(move |done, act, ctx| match done {
            Ok(Ok(s)) => act.queued(&s, ctx),
            Ok(Err(refused)) => log::info!("{sid} was not queued for a human: {refused:?}"),
            Err(e) => log::error!("queueing {sid} for a human failed: {e}"),
        }));
    }

    /// Puts a conversation in the human queue (or tells its members it is already with an
    /// agent). Also the way in for conversations no AI can answer.
    fn queued(&mut self, s: &ChatSession, ctx: &mut Context<Self>) {
        let sid = s.id.clone();
        match s.human_requested_at {
            Some(since) if s.mode != MODE_HUMAN => {
                self.hold_queued(&sid, since, ctx);
                self.silence_ai(&sid, ctx);
                let frame = ServerFrame::HumanRequested {
                    session_id: sid.clone(),
                };
                self.broadcast(&sid, &frame);
                self.desk.touch(&sid);
                self.desk.queue_dirty = true;
            }
            _ => {
                let frame = ServerFrame::Mode {
                    session_id: sid.clone(),
                    mode: s.mode.clone(),
                    agent: None,
                };
                self.broadcast(&sid, &frame);
            }
        }
    }

    fn set_status(&mut self, cmd: DeskCommand, status: &'static str, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let sid = cmd.session_id.clone();
        let window = self.desk.settings.restore_window;
        let work = async move {
            db.run(move |c| Ok(session::set_status(c, &sid, status, window)?))
                .await
        };
        ctx.spawn(work.into_actor(self).map(move |done, act, ctx| {
            let sid = cmd.session_id;
            match done {
                Err(e) => act.refuse_db(cmd.conn_id, &sid, &e),
                Ok(StatusChange::NotFound) => {
                    act.refuse(cmd.conn_id, &sid, "not_found", "no such conversation")
                }
                Ok(StatusChange::NotRestorable) => act.refuse(
                    cmd.conn_id,
                    &sid,
                    "not_restorable",
                    "only a conversation deleted within the restore window can be restored",
                ),
                Ok(StatusChange::Done(s)) => act.status_changed(&sid, &s.status, ctx),
            }
        }));
    }

    /// A conversation's status changed: its members and the dashboards are told; a closed or
    /// deleted one leaves the queue and its answer in flight is cancelled.
    fn status_changed(&mut self, session_id: &str, status: &str, ctx: &mut Context<Self>) {
        if status != ACTIVE {
            let was_queued = matches!(self.desk.held.get(session_id), Some(Hold::Queued(_)));
            self.unhold(session_id, ctx);
            self.silence_ai(session_id, ctx);
            self.desk.queue_dirty |= was_queued;
        }
        let frame = ServerFrame::Status {
            session_id: session_id.to_string(),
            status: status.to_string(),
        };
        self.broadcast(session_id, &frame);
        self.desk.touch(session_id);
    }

    fn refuse_change(&mut self, conn_id: ConnId, session_id: &str, refused: &Refused) {
        let (code, message) = match refused {
            Refused::NotFound => ("not_found", "no such conversation"),
            Refused::NotActive => ("session_closed", "the conversation is closed or deleted"),
            Refused::AlreadyAssigned => (
                "already_assigned",
                "another agent has taken this conversation over",
            ),
            Refused::NotAssigned => (
                "not_assigned",
                "only the agent who took the conversation over (or an admin) can release it",
            ),
        };
        self.refuse(conn_id, session_id, code, message);
    }

    fn is_member(&self, conn_id: ConnId, session_id: &str) -> bool {
        self.conversations
            .get(session_id)
            .is_some_and(|c| c.members.contains_key(&conn_id))
    }

    fn unwatch(&mut self, conn_id: ConnId, session_id: String) {
        self.leave(conn_id, &session_id);
        let frame = ServerFrame::Unwatched { session_id };
        self.send_frame(conn_id, &frame);
    }
}

impl Handler<JoinDesk> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: JoinDesk, ctx: &mut Context<Self>) {
        if !self.connections.contains_key(&msg.conn_id) {
            return;
        }
        let arrived = self.desk.add_dashboard(msg.conn_id, msg.agent);
        // The newcomer learns who is online from its snapshot.
        self.desk.awaiting_snapshot.insert(msg.conn_id);
        if arrived {
            self.send_agents_online();
        }
        let db = self.db.clone();
        let max = self.desk.settings.snapshot_max;
        let read = async move {
            db.run(move |c| {
                let active = desk::active_ids(c, max)?;
                let queued = desk::queue_ids(c, max)?;
                Ok((desk::summaries(c, &active)?, desk::summaries(c, &queued)?))
            })
            .await
        };
        let conn_id = msg.conn_id;
        ctx.spawn(read.into_actor(self).map(move |read, act, _| {
            if !act.desk.awaiting_snapshot.remove(&conn_id) {
                return; // the socket closed meanwhile
            }
            act.send_snapshot(conn_id, read)
        }));
    }
}

impl SessionManager {
    fn send_snapshot(
        &mut self,
        conn_id: ConnId,
        read: Result<(Vec<Summary>, Vec<Summary>), DbError>,
    ) {
        match read {
            Ok((sessions, queue)) => {
                let frame = ServerFrame::Snapshot {
                    sessions: sessions.into_iter().map(|s| self.summary_view(s)).collect(),
                    queue: queue.into_iter().map(|s| self.summary_view(s)).collect(),
                    agents_online: self.desk.agents_online(),
                    list_max: self.desk.settings.snapshot_max,
                };
                self.send_frame(conn_id, &frame);
            }
            Err(e) => {
                log::error!("reading the desk snapshot failed: {e}");
                let frame = ServerFrame::error(
                    "unavailable",
                    "the conversation list could not be read; reconnect to try again",
                );
                self.send_frame(conn_id, &frame);
            }
        }
    }
}

impl Handler<DeskCommand> for SessionManager {
    type Result = ();

    fn handle(&mut self, cmd: DeskCommand, ctx: &mut Context<Self>) {
        if self.draining.is_some() {
            // A change made now could be cut off by the close; the next node takes it.
            return self.refuse(
                cmd.conn_id,
                &cmd.session_id,
                "shutting_down",
                "the server is restarting; reconnect and try again",
            );
        }
        match cmd.op {
            DeskOp::Watch => {
                let (conn_id, sid) = (cmd.conn_id, cmd.session_id);
                self.join(conn_id, sid, Some(0), true, ctx);
            }
            DeskOp::Unwatch => self.unwatch(cmd.conn_id, cmd.session_id),
            DeskOp::Takeover => self.takeover(cmd, ctx),
            DeskOp::Release => self.release(cmd, ctx),
            DeskOp::RequestHuman => self.request_human(cmd, ctx),
            DeskOp::SetStatus(status) => self.set_status(cmd, status, ctx),
        }
    }
}

impl Handler<StatusChanged> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: StatusChanged, ctx: &mut Context<Self>) {
        self.status_changed(&msg.session_id, &msg.status, ctx);
    }
}

impl Handler<ConversationCreated> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: ConversationCreated, _: &mut Context<Self>) {
        self.desk.created(msg.session_id);
    }
}

impl Handler<ConnectedAccounts> for SessionManager {
    type Result = MessageResult<ConnectedAccounts>;

    fn handle(&mut self, _: ConnectedAccounts, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.connections
                .iter()
                .map(|(id, c)| (*id, c.user_id.clone(), c.role))
                .collect(),
        )
    }
}

impl Handler<KickConnections> for SessionManager {
    type Result = ();

    fn handle(&mut self, msg: KickConnections, _: &mut Context<Self>) {
        for (conn_id, kick) in msg.kicks {
            self.kick(conn_id, kick);
        }
    }
}

impl Handler<KickAccount> for SessionManager {
    type Result = usize;

    fn handle(&mut self, msg: KickAccount, _: &mut Context<Self>) -> usize {
        let conns: Vec<ConnId> = self
            .connections
            .iter()
            .filter(|(_, c)| c.user_id == msg.user_id)
            .map(|(id, _)| *id)
            .collect();
        for &conn_id in &conns {
            self.kick(conn_id, msg.kick.clone());
        }
        conns.len()
    }
}

impl SessionManager {
    /// Closes a connection with a reason and forgets it at once, so that nothing more is
    /// delivered to it meanwhile.
    fn kick(&mut self, conn_id: ConnId, kick: Kick) {
        if let Some(conn) = self.connections.get(&conn_id) {
            log::info!(
                "closing connection {conn_id} of {}: {}",
                conn.user_id,
                kick.code
            );
            conn.kick.do_send(kick);
        }
        self.forget(conn_id);
    }
}
