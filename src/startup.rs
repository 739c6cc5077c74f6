//! Builds the application: pool, actors, HTTP server. Used by `switchboard serve` and by the
//! integration tests, which bind port 0.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App};
use anyhow::Context;

use actix::{Actor, Addr};

use crate::actors::account_watch::AccountWatch;
use crate::actors::inference::{Answering, InferencePool};
use crate::actors::persistence::Db;
use crate::actors::session_manager::desk::DeskSettings;
use crate::actors::session_manager::messages::Drain;
use crate::actors::session_manager::{Coalescing, SessionManager, Writes};
use crate::actors::ws_session::OpenSockets;
use crate::auth::JwtKeys;
use crate::cache::{AnswerCache, MemoryCache, MEMORY_CACHE_ENTRIES};
use crate::config::Settings;
use crate::db;
use crate::providers;
use crate::providers::metrics::AiMetrics;
use crate::providers::resilient::{Policy, Resilient};
use crate::ratelimit::{self, RateLimits};
use crate::routes;
use crate::telemetry::RequestId;

/// What every handler can reach.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub jwt: JwtKeys,
    pub manager: Addr<SessionManager>,
    /// Where sockets hand the messages they receive.
    pub writes: Writes,
    /// The WebSockets open now (shutdown waits for them to close).
    pub sockets: OpenSockets,
    /// The AI providers behind their retry and breaker policy.
    pub ai: Arc<Resilient>,
    pub limits: Arc<RateLimits>,
}

pub struct Application {
    port: u16,
    server: Server,
    manager: Addr<SessionManager>,
    sockets: OpenSockets,
    shutdown_timeout: Duration,
}

impl Application {
    /// Connects to the database, applies migrations, starts the actors and binds the listener.
    /// Must run inside an actix `System`.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let db = connect(&settings).await?;
        let applied = db
            .run(|c| Ok(db::run_migrations(c)))
            .await
            .context("running migrations")??;
        for name in &applied {
            log::info!("applied migration {name}");
        }
        db.keep_search_index_merged();

        let address = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&address).with_context(|| {
            format!("binding {address}; is another server using the port? Set PORT to move")
        })?;
        let port = listener.local_addr()?.port();

        let provider = providers::build(&settings.ai.provider, &settings.ai)
            .await
            .with_context(|| format!("setting up the AI provider `{}`", settings.ai.provider))?;
        if provider.is_demo() {
            log::warn!(
                "AI_PROVIDER is demo: customers get canned answers. Set AI_PROVIDER=bedrock or openai"
            );
        }
        let fallback = match settings.ai.fallback_provider.as_str() {
            "" => None,
            name => {
                let mut ai = settings.ai.clone();
                if !ai.fallback_model.is_empty() {
                    ai.model = ai.fallback_model.clone();
                }
                let built = providers::build(name, &ai)
                    .await
                    .with_context(|| format!("setting up the fallback AI provider `{name}`"))?;
                Some(built)
            }
        };
        let ai = Arc::new(Resilient::new(
            provider,
            fallback,
            Policy::from_settings(&settings.ai),
            settings.ai.breaker_failures,
            settings.ai.breaker_cooldown.get(),
            Arc::new(AiMetrics::default()),
            &settings.ai.models,
        ));
        let cache: Option<Arc<dyn AnswerCache>> = settings.ai.enable_cache.then(|| {
            Arc::new(MemoryCache::new(
                settings.ai.cache_ttl.get(),
                MEMORY_CACHE_ENTRIES,
            )) as Arc<dyn AnswerCache>
        });
        let inference = InferencePool::start(
            settings.ai.workers,
            ai.clone(),
            db.clone(),
            Answering {
                history_messages: settings.ai.history_messages,
                system_prompt: settings.ai.system_prompt.clone(),
                cache,
            },
        );
        let held_at_start = db
            .run(|c| Ok(db::models::desk::held(c)?))
            .await
            .context("reading the conversations taken over or waiting for a human")?;
        let (manager, writes) = SessionManager::start(
            db.clone(),
            inference,
            settings.database.group_commit_max,
            settings.realtime.resume_max,
            settings.realtime.outbound_queue,
            Coalescing {
                max_messages: settings.ai.batch_size.max(1),
                pause: settings.ai.batch_timeout.get(),
            },
            DeskSettings {
                human_wait: settings.chat.human_wait.get(),
                snapshot_max: settings.chat.desk_snapshot_max.max(1),
                restore_window: chrono::Duration::from_std(settings.chat.restore_window.get())
                    .unwrap_or_else(|_| chrono::Duration::days(7)),
                held_at_start,
            },
        );
        AccountWatch::new(
            db.clone(),
            manager.clone(),
            settings.realtime.account_check_interval.get(),
        )
        .start();
        let shutdown_timeout = settings.server.shutdown_timeout.get();
        let sockets = OpenSockets::default();
        let state = web::Data::new(AppState {
            jwt: JwtKeys::new(&settings.auth)?,
            settings: Arc::new(settings.clone()),
            db,
            manager: manager.clone(),
            writes,
            sockets: sockets.clone(),
            ai,
            limits: Arc::new(RateLimits::new(&settings.rate_limit)),
        });
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let route_settings = Arc::new(settings);
        let server = crate::server::serve(listener, workers, shutdown_timeout, move || {
            let route_settings = route_settings.clone();
            App::new()
                .app_data(state.clone())
                .wrap(actix_web::middleware::from_fn(
                    ratelimit::http::limit_sign_in,
                ))
                .wrap(routes::json_errors())
                .wrap(RequestId)
                .configure(move |cfg| routes::configure(cfg, &route_settings))
        })?;
        log::info!("listening on {address} (port {port})");
        Ok(Application {
            port,
            server,
            manager,
            sockets,
            shutdown_timeout,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that can stop the server (tests restart it).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }

    /// Runs until SIGTERM or SIGINT, then drains: stops accepting connections, interrupts
    /// the answers in flight (stored as interrupted), waits for every pending write, closes
    /// each WebSocket with a reason, and lets open HTTP requests finish. Each wait is bounded
    /// by `server.shutdown_timeout`.
    pub async fn run_until_signalled(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        // The server future also answers `pause` and `stop`: it keeps running on its own.
        let mut server = actix_rt::spawn(self.server);
        tokio::select! {
            stopped = &mut server => {
                return stopped
                    .context("the HTTP server task failed")?
                    .context("running the HTTP server")
            }
            signal = shutdown_signal() => log::info!("{}: shutting down", signal?),
        }
        handle.pause().await;
        let (done, drained) = tokio::sync::oneshot::channel();
        self.manager.do_send(Drain {
            grace: self.shutdown_timeout,
            done,
        });
        // The manager keeps its own deadline; this one only guards against it being gone.
        let margin = self.shutdown_timeout + Duration::from_secs(1);
        if tokio::time::timeout(margin, drained).await.is_err() {
            log::warn!("the conversations did not drain in time");
        }
        // Each socket has been told to close; its task writes the close frame and ends. The
        // HTTP server does not count these tasks, so they are waited for here.
        if tokio::time::timeout(margin, self.sockets.all_closed())
            .await
            .is_err()
        {
            log::warn!(
                "{} WebSocket(s) still open after the grace period",
                self.sockets.count()
            );
        }
        handle.stop(true).await;
        server
            .await
            .context("the HTTP server task failed")?
            .context("stopping the HTTP server")
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C); returns its name.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        })
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("listening for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

/// Opens the pool and starts the persistence actor. Must run inside an actix `System`.
pub async fn connect(settings: &Settings) -> anyhow::Result<Db> {
    let database = settings.database.clone();
    // Opening the first connections blocks; keep it off the async thread.
    let (pool, backend) = tokio::task::spawn_blocking(move || db::build_pool(&database))
        .await
        .context("opening the database pool")??;
    log::info!(
        "database: {} (pool of {}, {} idle)",
        backend.as_str(),
        settings.database.max_open_conns,
        settings.database.max_idle_conns
    );
    Db::start(pool, backend, settings.database.write_lanes).context("starting the database threads")
}
