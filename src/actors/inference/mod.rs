//! InferenceWorker actors: a supervised pool that runs provider calls.
//!
//! Each worker lives on its own arbiter (thread) under a `Supervisor`. A worker runs every
//! answer as a separate task, so one slow answer does not hold up another. actix does not
//! survive panics by itself (`Supervisor` restarts an actor that stopped, not one that
//! panicked, and a panic takes down the arbiter thread), so each answer runs inside
//! `catch_unwind`: a panicking provider costs that one answer, which ends as
//! `ai_failed`; the worker then stops and its supervisor starts a fresh one, and every other
//! answer goes on. The SessionManager talks to the pool through [`InferencePool`].

pub mod messages;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use futures_util::{FutureExt, StreamExt};

use messages::ProviderPanicked;
pub use messages::StartReply;

use crate::actors::persistence::{panic_message, Db};
use crate::actors::session_manager::messages::{ReplyFinished, ReplyOutcome, TokenChunk};
use crate::db::models::message::{self, Order};
use crate::providers::{ChatRequest, Provider, Turn};

pub struct InferenceWorker {
    index: usize,
    provider: Arc<dyn Provider>,
    db: Db,
    history_messages: i64,
}

impl Actor for InferenceWorker {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        log::debug!(
            "inference worker {} ready ({})",
            self.index,
            self.provider.name()
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
        let provider = self.provider.clone();
        let db = self.db.clone();
        let limit = self.history_messages;
        let me = ctx.address();
        let finished = msg.finished.clone();
        let (session_id, reply_id) = (msg.session_id.clone(), msg.reply_id.clone());
        let model = provider.model().to_string();
        actix::spawn(async move {
            let outcome = match AssertUnwindSafe(write_reply(provider, db, limit, msg))
                .catch_unwind()
                .await
            {
                Ok(outcome) => outcome,
                Err(panic) => {
                    log::error!(
                        "the provider panicked while answering in {session_id}: {}",
                        panic_message(&panic)
                    );
                    me.do_send(ProviderPanicked);
                    ReplyOutcome::Failed {
                        code: "ai_failed",
                        message: "the AI consultant failed while answering; please try again"
                            .into(),
                    }
                }
            };
            finished.do_send(ReplyFinished {
                session_id,
                reply_id,
                outcome,
                model: Some(model),
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

/// Loads the conversation, streams the provider's answer to the SessionManager, and says how
/// it ended. Runs as its own task.
async fn write_reply(
    provider: Arc<dyn Provider>,
    db: Db,
    limit: i64,
    msg: StartReply,
) -> ReplyOutcome {
    let StartReply {
        session_id,
        reply_id,
        mut cancel,
        tokens,
        ..
    } = msg;
    let sid = session_id.clone();
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
            return ReplyOutcome::Failed {
                code: "ai_failed",
                message: "the conversation could not be loaded for the AI consultant".into(),
            };
        }
    };
    let mut stream = provider.stream(ChatRequest {
        session_id: session_id.clone(),
        history,
    });
    loop {
        tokio::select! {
            biased;
            _ = &mut cancel => return ReplyOutcome::Cancelled,
            next = stream.next() => match next {
                Some(Ok(delta)) => tokens.do_send(TokenChunk {
                    session_id: session_id.clone(),
                    reply_id: reply_id.clone(),
                    delta,
                }),
                Some(Err(e)) => {
                    log::warn!("provider {} failed in {session_id}: {e}", provider.name());
                    return ReplyOutcome::Failed {
                        code: "ai_failed",
                        message: "the AI consultant failed while answering; please try again".into(),
                    };
                }
                None => return ReplyOutcome::Complete,
            }
        }
    }
}

/// The pool: starts the workers and hands out answers round-robin.
#[derive(Clone)]
pub struct InferencePool {
    workers: Arc<Vec<Addr<InferenceWorker>>>,
    next: Arc<AtomicUsize>,
}

impl InferencePool {
    pub fn start(
        size: usize,
        provider: Arc<dyn Provider>,
        db: Db,
        history_messages: i64,
    ) -> InferencePool {
        let workers = (0..size.max(1))
            .map(|index| {
                let provider = provider.clone();
                let db = db.clone();
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| InferenceWorker {
                    index,
                    provider,
                    db,
                    history_messages,
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
