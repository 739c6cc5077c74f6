//! InferenceWorker actors: a supervised pool that runs provider calls.
//!
//! Each worker lives on its own arbiter (thread) under a `Supervisor`. A worker runs every
//! answer as a separate task, so one slow answer does not hold up another. actix does not
//! survive panics by itself (`Supervisor` restarts an actor that stopped, not one that
//! panicked, and a panic takes down the arbiter thread), so each answer runs inside
//! `catch_unwind`: a panicking provider costs that one answer, which ends as
//! `ai_failed`; the worker then stops and its supervisor starts a fresh one, and every other
//! answer goes on. The SessionManager talks to the pool through [`InferencePool`].
//!
//! Providers are reached through [`Resilient`] (timeouts, retries, circuit breakers, the
//! fallback); an answer no provider can start ends as `ai_unavailable`, one that breaks after
//! its first token as `ai_failed`. With the answer cache on, an identical context is
//! answered from the cache, streamed token by token like a fresh answer.

pub mod messages;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::oneshot::error::TryRecvError;

use messages::ProviderPanicked;
pub use messages::StartReply;

use crate::actors::persistence::{panic_message, Db};
use crate::actors::session_manager::messages::{ReplyFinished, ReplyOutcome, TokenChunk};
use crate::cache::{context_key, AnswerCache, CachedAnswer};
use crate::db::models::message::{self, Order};
use crate::providers::demo;
use crate::providers::resilient::Resilient;
use crate::providers::{ChatRequest, Chunk, Turn, Usage};

/// The code of an answer no provider could start: the conversation is offered to a human.
pub const AI_UNAVAILABLE: &str = "ai_unavailable";

pub struct InferenceWorker {
    index: usize,
    ai: Arc<Resilient>,
    db: Db,
    answers: Arc<Answering>,
}

/// How answers are prepared, shared by every worker.
pub struct Answering {
    /// Stored messages given to the model as the conversation so far.
    pub history_messages: i64,
    /// Part of an answer's context, so part of its cache key.
    pub system_prompt: String,
    /// Answers given before, by context; `None` when caching is off.
    pub cache: Option<Arc<dyn AnswerCache>>,
}

impl Actor for InferenceWorker {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        log::debug!(
            "inference worker {} ready ({})",
            self.index,
            self.ai.primary().name()
        );
    }
}

impl Supervised for InferenceWorker {
    fn restarting(&mut self, _: &mut Context<Self>) {
        log::warn!(
            "inference worker {} is being replaced after a provider panic",
            self.index
        );
    }
}

impl Handler<StartReply> for InferenceWorker {
    type Result = ();

    fn handle(&mut self, msg: StartReply, ctx: &mut Context<Self>) {
        let ai = self.ai.clone();
        let db = self.db.clone();
        let answers = self.answers.clone();
        let me = ctx.address();
        let finished = msg.finished.clone();
        let (session_id, reply_id) = (msg.session_id.clone(), msg.reply_id.clone());
        let primary_model = ai.primary().model().to_string();
        actix::spawn(async move {
            let (outcome, usage, model) = match AssertUnwindSafe(write_reply(ai, db, answers, msg))
                .catch_unwind()
                .await
            {
                Ok(done) => done,
                Err(panic) => {
                    log::error!(
                        "the provider panicked while answering in {session_id}: {}",
                        panic_message(&panic)
                    );
                    me.do_send(ProviderPanicked);
                    let failed = ReplyOutcome::Failed {
                        code: "ai_failed",
                        message: "the AI consultant failed while answering; please try again"
                            .into(),
                    };
                    (failed, None, Some(primary_model))
                }
            };
            finished.do_send(ReplyFinished {
                session_id,
                reply_id,
                outcome,
                model,
                tokens: usage.and_then(|u| i32::try_from(u.output_tokens).ok()),
            });
        });
    }
}

impl Handler<ProviderPanicked> for InferenceWorker {
    type Result = ();

    fn handle(&mut self, _: ProviderPanicked, ctx: &mut Context<Self>) {
        // Answers already running are separate tasks and go on; the supervisor restarts us.
        ctx.stop();
    }
}

/// How an answer ended, what it cost, and which model gave it.
type Written = (ReplyOutcome, Option<Usage>, Option<String>);

fn failed_midway() -> ReplyOutcome {
    ReplyOutcome::Failed {
        code: "ai_failed",
        message: "the AI consultant failed while answering; please try again".into(),
    }
}

/// Loads the conversation, streams the answer to the SessionManager, and says how it ended.
/// Runs as its own task.
async fn write_reply(
    ai: Arc<Resilient>,
    db: Db,
    answers: Arc<Answering>,
    msg: StartReply,
) -> Written {
    let StartReply {
        session_id,
        reply_id,
        mut cancel,
        tokens,
        ..
    } = msg;
    let sid = session_id.clone();
    let limit = answers.history_messages;
    let history = match db
        .run(move |c| Ok(message::page(c, &sid, Order::Desc, None, limit)?))
        .await
    {
        Ok(mut rows) => {
            rows.reverse();
            rows.into_iter()
                .map(|m| Turn {
                    role: m.role,
                    content: m.content,
                })
                .collect()
        }
        Err(e) => {
            log::error!("loading history for {session_id} failed: {e}");
            let failed = ReplyOutcome::Failed {
                code: "ai_failed",
                message: "the conversation could not be loaded for the AI consultant".into(),
            };
            return (failed, None, None);
        }
    };
    let request = ChatRequest {
        session_id: session_id.clone(),
        history,
        model: None,
    };
    let cache_key = answers.cache.as_ref().map(|_| {
        let primary = ai.primary();
        context_key(
            primary.name(),
            &ai.active_model(),
            &answers.system_prompt,
            &request.history,
        )
    });
    if let (Some(cache), Some(key)) = (&answers.cache, &cache_key) {
        if let Some(hit) = cache.get(key).await {
            ai.metrics().cache_hit(&hit.provider, &hit.model);
            // Streamed the same way as a fresh answer, so clients cannot tell the difference.
            for delta in demo::tokens(&hit.text) {
                if !matches!(cancel.try_recv(), Err(TryRecvError::Empty)) {
                    return (ReplyOutcome::Cancelled, None, Some(hit.model));
                }
                tokens.do_send(TokenChunk {
                    session_id: session_id.clone(),
                    reply_id: reply_id.clone(),
                    delta,
                });
            }
            return (ReplyOutcome::Complete, None, Some(hit.model));
        }
    }
    let opened = tokio::select! {
        biased;
        _ = &mut cancel => return (ReplyOutcome::Cancelled, None, None),
        opened = ai.open(&request) => opened,
    };
    let mut opened = match opened {
        Ok(opened) => opened,
        Err(e) => {
            log::error!("no AI provider could answer in {session_id}: {e}");
            let unavailable = ReplyOutcome::Failed {
                code: AI_UNAVAILABLE,
                message: "the AI consultant is unavailable right now; a human agent has been \
                          asked to take over"
                    .into(),
            };
            return (unavailable, None, None);
        }
    };
    let model = Some(opened.model.clone());
    let mut usage = None;
    let mut text = String::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut cancel => return (ReplyOutcome::Cancelled, usage, model),
            next = opened.stream.next() => match next {
                Some(Ok(Chunk::Text(delta))) => {
                    if cache_key.is_some() {
                        text.push_str(&delta);
                    }
                    tokens.do_send(TokenChunk {
                        session_id: session_id.clone(),
                        reply_id: reply_id.clone(),
                        delta,
                    });
                }
                Some(Ok(Chunk::Usage(u))) => usage = Some(u),
                Some(Err(_)) => return (failed_midway(), usage, model),
                None => break,
            }
        }
    }
    // Only the primary's whole answers are kept: a fallback's stands in for a moment.
    if let (Some(cache), Some(key)) = (&answers.cache, cache_key) {
        if !opened.is_fallback && !text.is_empty() {
            let answer = CachedAnswer {
                text,
                provider: opened.provider.clone(),
                model: opened.model.clone(),
            };
            cache.put(key, answer).await;
        }
    }
    (ReplyOutcome::Complete, usage, model)
}

/// The pool: starts the workers and hands out answers round-robin.
#[derive(Clone)]
pub struct InferencePool {
    workers: Arc<Vec<Addr<InferenceWorker>>>,
    next: Arc<AtomicUsize>,
}

impl InferencePool {
    pub fn start(size: usize, ai: Arc<Resilient>, db: Db, answers: Answering) -> InferencePool {
        let answers = Arc::new(answers);
        let workers = (0..size.max(1))
            .map(|index| {
                let ai = ai.clone();
                let db = db.clone();
                let answers = answers.clone();
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| InferenceWorker {
                    index,
                    ai,
                    db,
                    answers,
                })
            })
            .collect();
        InferencePool {
            workers: Arc::new(workers),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn start_reply(&self, msg: StartReply) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[i].do_send(msg);
    }
}
