//! WsSession: one actor per WebSocket connection.
//!
//! Runs on the HTTP worker's arbiter that accepted the connection. Once the upgrade is
//! answered the server hands over the raw socket ([`Accepted::run`]): this actor reads it (a
//! [`socket::FrameReader`] added as a stream), checks each frame against the caller's rights,
//! and hands it to the SessionManager. Writing is the connection task's own loop
//! ([`socket::write_loop`]), which drains the connection's bounded outbound queue into the
//! socket; the SessionManager and this actor both queue into it. Registers with the
//! SessionManager in `started()`, leaves in `stopping()`, pings on a heartbeat and drops a
//! client that stays silent too long.
//!
//! What one client can make the node hold is bounded here: frames are read one at a time
//! (the socket waits meanwhile), each takes a token from this socket's budget (over it:
//! `rate_limited`, and a close if the client keeps on), each `send` a token from the user's
//! message budget, and at most `max_pending_acks` sends wait for their ack at once. No frame
//! is read while the outbound queue is low on room, so that answering a client's own frames
//! does not fill its queue.

pub mod messages;
pub mod socket;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::ProtocolError;
use bytes::BytesMut;
use bytestring::ByteString;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::actors::persistence::Db;
use crate::actors::session_manager::messages::{
    ConnId, Connect, DeskCommand, DeskOp, Disconnect, Join, JoinDesk, Leave, Origin, Out,
    PostMessage, StopReply, Typing,
};
use crate::actors::session_manager::{SessionManager, Writes};
use crate::auth::AuthUser;
use crate::db::models::{message, session as sessions};
use crate::protocol::{self, AgentView, ClientFrame, ServerFrame};
use crate::ratelimit::{Bucket, RateLimits};

pub use messages::Kick;
use socket::{FrameReader, Inbound, Room};

const MAX_SESSION_ID_BYTES: usize = 64;
/// Outbound slots the reader keeps free beyond the acks and echoes of the sends in flight:
/// for answers' tokens, presence, typing and other members' messages.
const ROOM_FOR_OTHERS: usize = 32;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Limits a connection works within.
#[derive(Clone)]
pub struct Limits {
    pub heartbeat_interval: Duration,
    pub client_timeout: Duration,
    pub max_message_bytes: usize,
    /// Largest WebSocket message read, joined from its frames.
    pub max_frame_bytes: usize,
    /// Frames that may wait for the socket before the client counts as a slow consumer.
    pub outbound_queue: usize,
    /// Sends not yet acknowledged (or refused) past which a `send` is refused.
    pub max_pending_acks: usize,
    pub rates: Arc<RateLimits>,
}

pub struct WsSession {
    id: ConnId,
    user: AuthUser,
    manager: Addr<SessionManager>,
    writes: Writes,
    db: Db,
    outbox: mpsc::Sender<Out>,
    /// Fired to make the writer close the socket at once, past whatever is queued.
    kill: Option<oneshot::Sender<Kick>>,
    limits: Limits,
    last_heard: Instant,
    /// Conversations this caller was found allowed into (checked once per connection).
    allowed: HashSet<String>,
    /// Conversations this socket asked the SessionManager to join when it sent there, and has
    /// not left since: a send there needs no `Join`. Only the socket's own `leave` or `unwatch`
    /// (or its end) takes it out of a conversation, so this cannot drift from the manager's.
    joined: HashSet<String>,
    /// Opened on the staff endpoint: gets the desk snapshot and updates.
    desk: bool,
    /// Sends handed on and not yet settled; the SessionManager counts them down.
    pending_acks: Arc<AtomicUsize>,
    /// This socket's frame budget.
    frames: Bucket,
    /// Frames refused in a row for going over the budget.
    refused_in_a_row: u32,
}

/// A WebSocket the HTTP layer accepted: who is on it and on what terms. The route puts it on
/// its `101 Switching Protocols` answer; the server hands it the socket once that is sent.
pub struct Accepted {
    pub user: AuthUser,
    pub manager: Addr<SessionManager>,
    pub writes: Writes,
    pub db: Db,
    pub limits: Limits,
    /// Opened on the staff endpoint.
    pub desk: bool,
    /// Counts this socket while it is open.
    pub open: OpenSockets,
}

/// How many WebSockets are open. Each runs as a task of its own, which the HTTP server does
/// not wait for when it stops; shutdown waits for this to reach 0 instead, so that every
/// socket has written its close frame first.
#[derive(Clone)]
pub struct OpenSockets(Arc<watch::Sender<usize>>);

impl Default for OpenSockets {
    fn default() -> OpenSockets {
        OpenSockets(Arc::new(watch::Sender::new(0)))
    }
}

impl OpenSockets {
    /// Counts one more socket until the guard is dropped.
    fn opened(&self) -> OpenSocket {
        self.0.send_modify(|n| *n += 1);
        OpenSocket(self.0.clone())
    }

    /// The sockets open now.
    pub fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Returns once no socket is open.
    pub async fn all_closed(&self) {
        let mut open = self.0.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = open.wait_for(|n| *n == 0).await;
    }
}

/// One open socket, counted in [`OpenSockets`] until dropped.
struct OpenSocket(Arc<watch::Sender<usize>>);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Accepted {
    /// Starts the actor on the socket and then writes to it until the connection ends.
    /// `read` holds whatever the client sent right after its upgrade request.
    pub async fn run(self, io: TcpStream, read: BytesMut) {
        let _open = self.open.opened();
        // Frames are gathered into writes by the writer; Nagle would only add delay.
        if let Err(e) = io.set_nodelay(true) {
            log::debug!("setting TCP_NODELAY: {e}");
        }
        let (reader, writer) = io.into_split();
        let Accepted {
            user,
            manager,
            writes,
            db,
            limits,
            desk,
            open: _,
        } = self;
        let (outbox, rx) = mpsc::channel(limits.outbound_queue.max(1));
        let (kill, killed) = oneshot::channel();
        let made_room = Arc::new(Notify::new());
        // Each send still waiting for its ack has two frames coming: the ack and the echo.
        let headroom = 2 * limits.max_pending_acks + ROOM_FOR_OTHERS;
        let room = Room::new(outbox.clone(), headroom, made_room.clone());
        WsSession::create(move |ctx| {
            ctx.add_stream(FrameReader::new(reader, read, limits.max_frame_bytes, room));
            WsSession {
                id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                user,
                manager,
                writes,
                db,
                outbox,
                kill: Some(kill),
                frames: Bucket::new(limits.rates.ws_frames),
                limits,
                last_heard: Instant::now(),
                allowed: HashSet::new(),
                joined: HashSet::new(),
                desk,
                pending_acks: Arc::new(AtomicUsize::new(0)),
                refused_in_a_row: 0,
            }
        });
        socket::write_loop(writer, rx, killed, made_room).await;
    }
}

impl WsSession {
    /// Queues a frame of our own (hello, pong, errors). A full queue means a slow consumer.
    fn send(&mut self, frame: &ServerFrame, ctx: &mut Context<Self>) {
        let text = ByteString::from(frame.to_text());
        if self.outbox.try_send(Out::Frame(text)).is_err() {
            self.close_with(
                Kick {
                    code: "slow_consumer",
                    message: "you are not reading fast enough; reconnect and resume".into(),
                },
                ctx,
            );
        }
    }

    fn refuse(
        &mut self,
        code: &str,
        message: impl Into<String>,
        session_id: Option<&str>,
        ctx: &mut Context<Self>,
    ) {
        let frame = ServerFrame::Error {
            code: code.to_string(),
            message: message.into(),
            session_id: session_id.map(str::to_string),
            client_id: None,
        };
        self.send(&frame, ctx);
    }

    /// Tells the client why, closes the socket and stops.
    fn close_with(&mut self, kick: Kick, ctx: &mut Context<Self>) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(kick);
        }
        ctx.stop();
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let frame = match protocol::parse(text) {
            Ok(frame) => frame,
            Err(e) => return self.refuse(e.code(), e.message(), None, ctx),
        };
        match frame {
            ClientFrame::Ping { nonce } => self.send(&ServerFrame::Pong { nonce }, ctx),
            ClientFrame::Send {
                session_id,
                client_id,
                content,
            } => {
                let checked = message::check_client_id(&client_id)
                    .and_then(|()| message::check_content(&content, self.limits.max_message_bytes));
                let refusal = match checked {
                    Err(invalid) => Some((invalid.code(), invalid.message())),
                    Ok(()) => self.may_send(),
                };
                if let Some((code, message)) = refusal {
                    let frame = ServerFrame::Error {
                        code: code.into(),
                        message,
                        session_id: Some(session_id),
                        client_id: Some(client_id)
                            .filter(|c| c.len() <= message::MAX_CLIENT_ID_BYTES),
                    };
                    return self.send(&frame, ctx);
                }
                self.with_access(session_id, ctx, move |act, session_id, _| {
                    // The sender is a member, to hear its own message: one `Join` per
                    // conversation, not one per send (a mailbox message less each time).
                    if act.joined.insert(session_id.clone()) {
                        act.manager.do_send(Join {
                            conn_id: act.id,
                            session_id: session_id.clone(),
                            after_seq: None,
                        });
                    }
                    // Counted down by the SessionManager when the ack or error goes out.
                    act.pending_acks.fetch_add(1, Ordering::Relaxed);
                    // Straight to the store; the outcome goes to the SessionManager, which
                    // acknowledges and delivers it (or, while shutting down, refuses it).
                    let post = PostMessage {
                        session_id: session_id.clone(),
                        author_id: act.user.id.clone(),
                        role: act.user.role,
                        client_id: Some(client_id.clone()),
                        content,
                        origin: Origin::Socket {
                            conn_id: act.id,
                            session_id,
                            client_id,
                        },
                    };
                    if let Err(post) = act.writes.post(post) {
                        act.manager.do_send(*post);
                    }
                });
            }
            ClientFrame::Resume {
                session_id,
                after_seq,
            } => {
                if after_seq < 0 {
                    return self.refuse(
                        "invalid_frame",
                        "`after_seq` must be 0 or more",
                        Some(&session_id),
                        ctx,
                    );
                }
                self.with_access(session_id, ctx, move |act, session_id, _| {
                    act.manager.do_send(Join {
                        conn_id: act.id,
                        session_id,
                        after_seq: Some(after_seq),
                    });
                });
            }
            ClientFrame::Typing { session_id, active } => {
                self.with_access(session_id, ctx, move |act, session_id, _| {
                    act.manager.do_send(Typing {
                        conn_id: act.id,
                        session_id,
                        active,
                    });
                });
            }
            ClientFrame::Stop { session_id } => {
                self.with_access(session_id, ctx, |act, session_id, _| {
                    act.manager.do_send(StopReply { session_id });
                });
            }
            ClientFrame::Leave { session_id } => {
                self.allowed.remove(&session_id);
                self.joined.remove(&session_id);
                self.manager.do_send(Leave {
                    conn_id: self.id,
                    session_id,
                });
            }
            desk_frame => self.on_desk_frame(desk_frame, ctx),
        }
    }

    /// The agent desk's frames: staff ones checked against the caller's role, then every one
    /// against access to the conversation, before the SessionManager acts on it.
    fn on_desk_frame(&mut self, frame: ClientFrame, ctx: &mut Context<Self>) {
        if frame.is_staff_only() && !self.user.is_staff() {
            return self.refuse("forbidden", "only agents and admins may do this", None, ctx);
        }
        let (session_id, op) = match frame {
            ClientFrame::Watch { session_id } => (session_id, DeskOp::Watch),
            ClientFrame::Unwatch { session_id } => (session_id, DeskOp::Unwatch),
            ClientFrame::Takeover { session_id } => (session_id, DeskOp::Takeover),
            ClientFrame::Release { session_id } => (session_id, DeskOp::Release),
            ClientFrame::Close { session_id } => (session_id, DeskOp::SetStatus(sessions::CLOSED)),
            ClientFrame::Delete { session_id } => {
                (session_id, DeskOp::SetStatus(sessions::DELETED))
            }
            ClientFrame::Restore { session_id } => {
                (session_id, DeskOp::SetStatus(sessions::ACTIVE))
            }
            ClientFrame::RequestHuman { session_id } => (session_id, DeskOp::RequestHuman),
            // The realtime frames are handled in `on_text`.
            _ => return,
        };
        self.with_access(session_id, ctx, move |act, session_id, _| {
            if matches!(op, DeskOp::Unwatch) {
                act.joined.remove(&session_id);
            }
            act.manager.do_send(DeskCommand {
                conn_id: act.id,
                user: AgentView {
                    user_id: act.user.id.clone(),
                    email: act.user.email.clone(),
                },
                role: act.user.role,
                session_id,
                op,
            });
        });
    }

    /// Why a well-formed `send` may not go ahead now, if it may not: the caller's message
    /// rate, or too many of this socket's messages still waiting for their ack.
    fn may_send(&self) -> Option<(&'static str, String)> {
        let pending = self.pending_acks.load(Ordering::Relaxed);
        if pending >= self.limits.max_pending_acks {
            return Some((
                "too_many_pending",
                format!("{pending} messages are still waiting for their ack; wait for them"),
            ));
        }
        let verdict = self.limits.rates.messages.check(&self.user.id);
        if !verdict.allowed {
            let wait = verdict.retry_after.as_millis().max(1);
            return Some((
                "rate_limited",
                format!("too many messages; this one was not stored. Retry in {wait} ms"),
            ));
        }
        None
    }

    /// Runs `then` once the caller is known to be allowed into `session_id`. The first check
    /// of a conversation reads the database; while it runs, this connection's later frames
    /// wait (`ctx.wait`), so frames are handled in the order they were sent.
    fn with_access<F>(&mut self, session_id: String, ctx: &mut Context<Self>, then: F)
    where
        F: FnOnce(&mut Self, String, &mut Context<Self>) + 'static,
    {
        if self.allowed.contains(&session_id) {
            return then(self, session_id, ctx);
        }
        // No conversation id holds NUL, and PostgreSQL refuses it in a query.
        if session_id.is_empty()
            || session_id.len() > MAX_SESSION_ID_BYTES
            || session_id.contains('\0')
        {
            return self.refuse("not_found", "no such conversation", Some(&session_id), ctx);
        }
        let db = self.db.clone();
        let sid = session_id.clone();
        let check = async move { db.run(move |c| Ok(sessions::find(c, &sid)?)).await };
        ctx.wait(check.into_actor(self).map(move |found, act, ctx| {
            let access = match found {
                Ok(found) => Access::decide(&act.user, found.as_ref()),
                Err(e) => {
                    log::error!("checking access to {session_id} failed: {e}");
                    return act.refuse(
                        "unavailable",
                        "the service cannot check this now; try again",
                        Some(&session_id),
                        ctx,
                    );
                }
            };
            match access {
                Access::Allowed => {
                    act.allowed.insert(session_id.clone());
                    then(act, session_id, ctx);
                }
                Access::Denied => {
                    act.refuse("not_found", "no such conversation", Some(&session_id), ctx)
                }
            }
        }));
    }

    /// Takes one frame from this socket's budget. Over it, the frame is refused and not read;
    /// a socket that goes on sending regardless is closed.
    fn within_budget(&mut self, ctx: &mut Context<Self>) -> bool {
        let verdict = self.frames.take(self.limits.rates.ws_frames);
        if verdict.allowed {
            self.refused_in_a_row = 0;
            return true;
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row >= self.limits.rates.ws_flood_close_after {
            log::warn!(
                "connection {} ({}) kept flooding past its frame limit; closing it",
                self.id,
                self.user.id
            );
            self.close_with(
                Kick {
                    code: "rate_limited",
                    message: "too many frames, still after being told; slow down and reconnect"
                        .into(),
                },
                ctx,
            );
        } else {
            let wait = verdict.retry_after.as_millis().max(1);
            self.refuse(
                "rate_limited",
                format!("too many frames; this one was not read. Retry in {wait} ms"),
                None,
                ctx,
            );
        }
        false
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.last_heard.elapsed() > self.limits.client_timeout {
            log::info!("connection {} timed out", self.id);
            return self.close_with(
                Kick {
                    code: "timeout",
                    message: "no frame or pong within the client timeout".into(),
                },
                ctx,
            );
        }
        if self.outbox.try_send(Out::Ping).is_err() {
            log::debug!("connection {}: queue full at heartbeat", self.id);
        }
    }
}

impl Actor for WsSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // `hello` is queued before the manager knows the connection, so it is the first frame.
        let hello = ServerFrame::Hello {
            protocol: protocol::VERSION,
            user_id: self.user.id.clone(),
            role: self.user.role.as_str().to_string(),
            heartbeat_ms: self.limits.heartbeat_interval.as_millis() as u64,
        };
        self.send(&hello, ctx);
        self.manager.do_send(Connect {
            conn_id: self.id,
            user_id: self.user.id.clone(),
            role: self.user.role,
            outbox: self.outbox.clone(),
            kick: ctx.address().recipient(),
            pending_acks: self.pending_acks.clone(),
        });
        if self.desk && self.user.is_staff() {
            self.manager.do_send(JoinDesk {
                conn_id: self.id,
                agent: AgentView {
                    user_id: self.user.id.clone(),
                    email: self.user.email.clone(),
                },
            });
        }
        ctx.run_interval(self.limits.heartbeat_interval, |act, ctx| {
            act.heartbeat(ctx)
        });
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        self.manager.do_send(Disconnect { conn_id: self.id });
        Running::Stop
    }
}

impl StreamHandler<Result<Inbound, ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<Inbound, ProtocolError>, ctx: &mut Context<Self>) {
        use Inbound as M;
        self.last_heard = Instant::now();
        if matches!(item, Ok(M::Text(_) | M::Binary(_))) && !self.within_budget(ctx) {
            return;
        }
        match item {
            Ok(M::Text(text)) => self.on_text(&text, ctx),
            Ok(M::Binary(_)) => self.refuse(
                "binary_not_supported",
                "frames are JSON text; binary frames are not read",
                None,
                ctx,
            ),
            Ok(M::Ping(bytes)) => {
                let _ = self.outbox.try_send(Out::Pong(bytes));
            }
            Ok(M::Pong(_)) => {}
            Ok(M::Close(reason)) => {
                log::debug!("connection {} closed by the client: {reason:?}", self.id);
                ctx.stop();
            }
            Err(e) => {
                let (code, message) = match &e {
                    ProtocolError::Overflow => (
                        "frame_too_large",
                        "the frame is larger than the server accepts",
                    ),
                    ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
                        ("invalid_utf8", "a text frame was not valid UTF-8")
                    }
                    _ => ("protocol_error", "the WebSocket stream is broken"),
                };
                log::info!("connection {}: {e}", self.id);
                self.close_with(
                    Kick {
                        code,
                        message: message.into(),
                    },
                    ctx,
                );
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Kick> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Kick, ctx: &mut Context<Self>) {
        self.close_with(msg, ctx);
    }
}

/// Whether a caller may reach a conversation.
enum Access {
    Allowed,
    Denied,
}

impl Access {
    /// Customers reach their own live conversations; agents and admins reach any that exists.
    fn decide(user: &AuthUser, found: Option<&sessions::ChatSession>) -> Access {
        match found {
            Some(_) if user.is_staff() => Access::Allowed,
            Some(s) if s.user_id == user.id && s.status != sessions::DELETED => Access::Allowed,
            _ => Access::Denied,
        }
    }
}
