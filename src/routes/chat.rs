//! Asking the AI consultant over plain HTTP: `POST /chat/send` answers with the whole reply,
//! `POST /chat/stream` streams it as Server-Sent Events.
//!
//! Both go through the SessionManager exactly as a socket does: the request joins the
//! conversation as a listening member (a bounded outbox, like a socket's), then posts the
//! customer's message. So the message and the answer get their `seq`, are stored by the
//! committer, and are shown live to every socket in the conversation; the request reads
//! the answer from its outbox. A reader too slow for its outbox is dropped like a slow
//! socket, and the request ends with an error instead of holding memory.
//!
//! In a conversation an agent has taken over, or one waiting in the human queue, the AI is
//! silent: the question is stored and shown to the agent, and the request answers at once
//! with no answer and `"human"` saying who has the conversation. The same holds when that
//! happens while an answer is awaited; text already written is stored as interrupted first.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{web, HttpResponse};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::actors::inference::AI_UNAVAILABLE;
use crate::actors::session_manager::desk::HumanHold;
use crate::actors::session_manager::messages::{
    AppendFailure, ConnId, Connect, Disconnect, Join, Kick, Origin, Out, PostMessage,
};
use crate::actors::session_manager::SessionManager;
use crate::auth::AuthUser;
use crate::db::models::message::{self, Order, Rejected};
use crate::db::models::ChatMessage;
use crate::error::ApiError;
use crate::startup::AppState;

/// Frames an HTTP listener may hold before it counts as a slow reader.
const OUTBOX: usize = 256;
/// Added to the longest an answer can take (every try of every provider) before a request
/// stops waiting: the answer goes on and is stored either way.
const WAIT_MARGIN: Duration = Duration::from_secs(30);

/// A question refused by a server that is shutting down.
pub const NOT_STORED: &str =
    "the server is restarting and did not store this message; send it again in a moment";
/// A question stored, whose answer the shutdown cut off (what was written is stored).
const CUT_OFF: &str = "the server is restarting: your message is stored, the answer was cut \
     off; ask again in a moment";

/// HTTP listeners take ids from the top half of the range, sockets from the bottom.
static NEXT_LISTENER_ID: AtomicU64 = AtomicU64::new(1 << 63);

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chat/send").post(send))
        .service(web::resource("/chat/stream").post(stream_reply));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    session_id: String,
    message: String,
}

/// `/chat/send`: the stored question and the stored answer.
#[derive(Serialize)]
struct Answered {
    message: ChatMessage,
    /// `None` when a human has the conversation and nothing was written.
    answer: Option<ChatMessage>,
    /// `taken_over` or `queued` when a human has the conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    human: Option<&'static str>,
}

/// What a listener reads about its answer.
enum Event {
    Token(String),
    /// The answer is stored as `seq`.
    Done {
        seq: i64,
        interrupted: bool,
    },
    /// The answer failed; `code` is `ai_unavailable` when no provider could start it.
    Failed {
        code: String,
        message: String,
    },
    /// The server closed this listener (it is shutting down): nothing more will come.
    Closed {
        code: &'static str,
        message: String,
    },
    /// An agent took the conversation over, or it went to the human queue: the AI is silent.
    Human(HumanHold),
    /// The conversation was closed or deleted.
    Status(String),
}

/// Receives nothing: a listener learns it was dropped from its closed outbox.
struct KickSink;

impl Actor for KickSink {
    type Context = Context<Self>;
}

impl Handler<Kick> for KickSink {
    type Result = ();
    fn handle(&mut self, msg: Kick, _: &mut Context<Self>) {
        log::debug!("an HTTP listener was dropped: {}", msg.code);
    }
}

/// This request's place in the conversation; leaving it (on drop) tells the SessionManager.
struct Membership {
    conn_id: ConnId,
    manager: Addr<SessionManager>,
    _sink: Addr<KickSink>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.manager.do_send(Disconnect {
            conn_id: self.conn_id,
        });
    }
}

/// A request listening to one conversation for the answer to its message.
struct Listener {
    _membership: Membership,
    session_id: String,
    rx: mpsc::Receiver<Out>,
    /// The customer's message, as stored.
    asked: ChatMessage,
    /// The answer already being written when the message was stored: not ours, ours is next.
    earlier: Option<String>,
    earlier_done: bool,
    /// Ours, once its first token is seen.
    reply_id: Option<String>,
    /// Frames before our own message's are about earlier turns.
    seen_own_message: bool,
    /// Who has the conversation instead of the AI, if anyone.
    human: Option<HumanHold>,
    deadline: Instant,
}

impl Listener {
    /// Checks the request, joins the conversation and posts the message.
    async fn open(state: &AppState, caller: AuthUser, ask: Ask) -> Result<Listener, ApiError> {
        // A question is a message: the same per-user budget as every other way of posting.
        crate::ratelimit::http::enforce(state.limits.messages.check(&caller.id))?;
        if caller.is_staff() {
            return Err(ApiError::Forbidden(
                "only customers ask the AI consultant; agents post to the conversation",
            ));
        }
        let found = super::sessions::visible_session(state, &caller, ask.session_id).await?;
        message::check_content(&ask.message, state.settings.chat.max_message_bytes)
            .map_err(ApiError::InvalidInput)?;

        let conn_id = NEXT_LISTENER_ID.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(OUTBOX);
        let sink = KickSink.start();
        state.manager.do_send(Connect {
            conn_id,
            user_id: caller.id.clone(),
            role: caller.role,
            outbox: tx,
            kick: sink.clone().recipient(),
            // Counts a socket's unacknowledged sends; a listener sends nothing of its own.
            pending_acks: Arc::new(AtomicUsize::new(0)),
        });
        state.manager.do_send(Join {
            conn_id,
            session_id: found.id.clone(),
            after_seq: None,
        });
        let membership = Membership {
            conn_id,
            manager: state.manager.clone(),
            _sink: sink,
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        state.manager.do_send(PostMessage {
            session_id: found.id.clone(),
            author_id: caller.id,
            role: caller.role,
            client_id: None,
            content: ask.message,
            origin: Origin::Ask(done_tx),
        });
        let asked = match done_rx
            .await
            .map_err(|_| ApiError::Unavailable("the message store"))?
        {
            Ok(asked) => asked,
            Err(AppendFailure::Rejected(Rejected::SessionNotActive(status))) => {
                return Err(ApiError::SessionNotActive(status))
            }
            Err(AppendFailure::Rejected(Rejected::SessionNotFound)) => {
                return Err(ApiError::NotFound("conversation"))
            }
            Err(AppendFailure::Store) => return Err(ApiError::Unavailable("the message store")),
            Err(AppendFailure::ShuttingDown) => return Err(ApiError::ShuttingDown(NOT_STORED)),
        };
        let listener = Listener {
            _membership: membership,
            session_id: found.id,
            rx,
            asked: asked.appended.message,
            earlier: asked.earlier_reply,
            earlier_done: false,
            reply_id: None,
            seen_own_message: false,
            human: asked.human,
            deadline: Instant::now() + longest_wait(state),
        };
        Ok(listener)
    }

    /// The next thing that happened to our answer; `None` when the wait is over (the
    /// listener was dropped as too slow, or the answer took longer than any answer may).
    async fn next(&mut self) -> Option<Event> {
        loop {
            let deadline = tokio::time::Instant::from_std(self.deadline);
            let out = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            let frames = match out {
                Out::Frame(text) => vec![text],
                Out::Batch(texts) => texts,
                Out::Ping | Out::Pong(_) => continue,
                // Queued behind the last frames (the interrupted answer's `reply_done`).
                Out::Close(kick) => {
                    return Some(Event::Closed {
                        code: kick.code,
                        message: kick.message,
                    })
                }
            };
            for text in frames {
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(event) = self.read(&frame) {
                    return Some(event);
                }
            }
        }
    }

    fn read(&mut self, frame: &Value) -> Option<Event> {
        if frame["session_id"] != self.session_id.as_str() {
            return None;
        }
        let reply_id = frame["reply_id"].as_str();
        match frame["type"].as_str()? {
            "message" if frame["seq"].as_i64() == Some(self.asked.seq) => {
                self.seen_own_message = true;
                None
            }
            _ if !self.seen_own_message => None,
            "token" => {
                let id = reply_id?;
                if self.earlier.as_deref() == Some(id) {
                    return None;
                }
                let ours = self.reply_id.get_or_insert_with(|| id.to_string());
                (ours == id)
                    .then(|| Event::Token(frame["delta"].as_str().unwrap_or("").to_string()))
            }
            "reply_done" => {
                let id = reply_id?;
                if self.earlier.as_deref() == Some(id) {
                    self.earlier_done = true;
                    return None;
                }
                if self.reply_id.as_deref().is_some_and(|ours| ours != id) {
                    return None;
                }
                Some(Event::Done {
                    seq: frame["seq"].as_i64()?,
                    interrupted: frame["interrupted"].as_bool().unwrap_or(false),
                })
            }
            "mode" if frame["mode"] == "human" => Some(Event::Human(HumanHold::TakenOver)),
            "human_requested" => Some(Event::Human(HumanHold::Queued)),
            "status" if frame["status"] != "active" => Some(Event::Status(
                frame["status"].as_str().unwrap_or("closed").to_string(),
            )),
            // Errors name no answer. `ai_unavailable` means no provider could start, which
            // holds for ours too; another error is the earlier answer's until that one ended.
            "error"
                if frame["code"] == AI_UNAVAILABLE
                    || self.earlier.is_none()
                    || self.earlier_done
                    || self.reply_id.is_some() =>
            {
                Some(Event::Failed {
                    code: frame["code"].as_str().unwrap_or("ai_failed").to_string(),
                    message: frame["message"].as_str().unwrap_or("").to_string(),
                })
            }
            _ => None,
        }
    }
}

/// The longest any answer may take: every try of every provider, then the answer itself.
fn longest_wait(state: &AppState) -> Duration {
    let ai = &state.settings.ai;
    let providers = if ai.fallback_provider.is_empty() {
        1
    } else {
        2
    };
    let tries = ai.retry_attempts.max(1) * providers;
    ai.first_token_timeout.get() * tries + ai.answer_timeout.get() + WAIT_MARGIN
}

fn unavailable(message: String) -> ApiError {
    ApiError::AiUnavailable(if message.is_empty() {
        "the AI consultant is unavailable right now; a human agent has been asked to take over"
            .into()
    } else {
        message
    })
}

async fn stored(state: &AppState, session_id: &str, seq: i64) -> Result<ChatMessage, ApiError> {
    let sid = session_id.to_string();
    state
        .db
        .run(move |c| Ok(message::page(c, &sid, Order::Asc, Some(seq - 1), 1)?))
        .await?
        .into_iter()
        .find(|m| m.seq == seq)
        .ok_or_else(|| ApiError::internal(format!("answer {seq} in {session_id} is not stored")))
}

async fn send(
    state: web::Data<AppState>,
    caller: AuthUser,
    body: web::Json<Ask>,
) -> Result<HttpResponse, ApiError> {
    let mut listener = Listener::open(&state, caller, body.into_inner()).await?;
    let mut failure: Option<(String, String)> = None;
    let mut wrote = false;
    let answered = |listener: &Listener, answer: Option<ChatMessage>| {
        HttpResponse::Ok().json(Answered {
            message: listener.asked.clone(),
            answer,
            human: listener.human.map(HumanHold::as_str),
        })
    };
    if listener.human.is_some() {
        return Ok(answered(&listener, None));
    }
    loop {
        match listener.next().await {
            Some(Event::Token(_)) => wrote = true,
            Some(Event::Done { seq, .. }) => {
                let answer = stored(&state, &listener.session_id, seq).await?;
                return Ok(answered(&listener, Some(answer)));
            }
            // With text written, the interrupted answer is being stored: wait for it.
            Some(Event::Human(hold)) => {
                listener.human = Some(hold);
                if !wrote {
                    return Ok(answered(&listener, None));
                }
            }
            Some(Event::Status(status)) => {
                if !wrote {
                    return Err(ApiError::SessionNotActive(status));
                }
            }
            Some(Event::Closed { code, message }) => {
                log::info!(
                    "an answer in {} was cut off: {code}: {message}",
                    listener.session_id
                );
                return Err(ApiError::ShuttingDown(CUT_OFF));
            }
            Some(Event::Failed { code, message }) => {
                if !wrote {
                    if code == AI_UNAVAILABLE {
                        return Err(unavailable(message));
                    }
                    return Err(ApiError::AiFailed(message));
                }
                failure = Some((code, message));
            }
            None => {
                log::warn!(
                    "gave up waiting for the answer in {}{}",
                    listener.session_id,
                    failure
                        .map(|(c, _)| format!(" after {c}"))
                        .unwrap_or_default()
                );
                return Err(ApiError::AiFailed(
                    "the answer could not be followed to its end (it took too long, or this \
                     request fell behind); it is stored when it is finished"
                        .into(),
                ));
            }
        }
    }
}

fn sse(event: &str, data: &Value) -> web::Bytes {
    web::Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Where a stream is: what comes next, and what was seen so far.
struct Streaming {
    listener: Listener,
    pending: Option<Event>,
    wrote: bool,
    finished: bool,
}

impl Streaming {
    /// The next SSE event to send, if this step has one; sets `finished` after the last.
    async fn step(&mut self) -> Option<web::Bytes> {
        let event = match self.pending.take() {
            Some(event) => Some(event),
            None => self.listener.next().await,
        };
        match event {
            Some(Event::Token(delta)) => {
                self.wrote = true;
                Some(sse("token", &json!({ "delta": delta })))
            }
            Some(Event::Done { seq, interrupted }) => {
                self.finished = true;
                Some(self.done(Some(seq), interrupted))
            }
            // With text written, the interrupted answer is being stored: its `done` ends it.
            Some(Event::Human(hold)) => {
                self.listener.human = Some(hold);
                self.finished = !self.wrote;
                self.finished.then(|| self.done(None, false))
            }
            Some(Event::Status(status)) => {
                self.finished = !self.wrote;
                self.finished.then(|| {
                    let e = ApiError::SessionNotActive(status);
                    sse(
                        "error",
                        &json!({ "code": e.code(), "message": e.to_string() }),
                    )
                })
            }
            // Nothing written means nothing to store, so no `done` follows.
            Some(Event::Failed { code, message }) => {
                self.finished = !self.wrote;
                Some(sse("error", &json!({ "code": code, "message": message })))
            }
            Some(Event::Closed { .. }) => {
                self.finished = true;
                Some(sse(
                    "error",
                    &json!({"code": "shutting_down", "message": CUT_OFF}),
                ))
            }
            None => {
                self.finished = true;
                Some(sse(
                    "error",
                    &json!({"code": "ai_failed", "message": "the answer could not be followed to its end; it is stored when it is finished"}),
                ))
            }
        }
    }

    /// The last event: the stored answer's `seq` (none when a human has the conversation and
    /// nothing was written), and who has the conversation.
    fn done(&self, seq: Option<i64>, interrupted: bool) -> web::Bytes {
        let mut data = json!({
            "seq": seq,
            "interrupted": interrupted,
            "session_id": self.listener.session_id,
        });
        if let Some(hold) = self.listener.human {
            data["human"] = json!(hold.as_str());
        }
        sse("done", &data)
    }
}

async fn stream_reply(
    state: web::Data<AppState>,
    caller: AuthUser,
    body: web::Json<Ask>,
) -> Result<HttpResponse, ApiError> {
    let mut listener = Listener::open(&state, caller, body.into_inner()).await?;
    // The first event decides the status: no provider at all is a 503, not an empty stream.
    let first = match listener.human {
        Some(hold) => Some(Event::Human(hold)),
        None => listener.next().await,
    };
    match first {
        Some(Event::Failed {
            ref code,
            ref message,
        }) if code == AI_UNAVAILABLE => return Err(unavailable(message.clone())),
        Some(Event::Closed { .. }) => return Err(ApiError::ShuttingDown(CUT_OFF)),
        Some(Event::Status(status)) => return Err(ApiError::SessionNotActive(status)),
        _ => {}
    }
    let head = sse("message", &json!(listener.asked));
    let state = Streaming {
        listener,
        pending: first,
        wrote: false,
        finished: false,
    };
    let events = stream::unfold(state, |mut state| async move {
        if state.finished {
            return None;
        }
        let bytes = state.step().await;
        Some((bytes, state))
    })
    .filter_map(|bytes| async move { bytes.map(Ok::<_, Infallible>) });
    let body = stream::once(async move { Ok(head) }).chain(events);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}
