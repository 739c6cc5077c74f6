//! Builds the application: pool, actors, HTTP server. Used by `switchboard serve` and by the
//! integration tests, which bind port 0.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context;

use actix::{Actor, Addr};

use crate::actors::account_watch::AccountWatch;
use crate::actors::inference::InferencePool;
use crate::actors::persistence::Db;
use crate::actors::session_manager::desk::DeskSettings;
use crate::actors::session_manager::SessionManager;
use crate::auth::JwtKeys;
use crate::config::Settings;
use crate::db;
use crate::providers::demo::DemoProvider;
use crate::routes;
use crate::telemetry::RequestId;

/// How long a stopping server waits for open requests before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every handler can reach.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub jwt: JwtKeys,
    pub manager: Addr<SessionManager>,
}

pub struct Application {
    port: u16,
    server: Server,
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

        let address = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&address).with_context(|| {
            format!("binding {address}; is another server using the port? Set PORT to move")
        })?;
        let port = listener.local_addr()?.port();

        let provider = Arc::new(DemoProvider::new(
            settings.ai.demo_token_delay.get(),
            &settings.ai.demo_panic_trigger,
        ));
        let inference = InferencePool::start(
            settings.ai.workers,
            provider,
            db.clone(),
            settings.ai.history_messages,
        );
        let held_at_start = db
            .run(|c| Ok(db::models::desk::held(c)?))
            .await
            .context("reading the conversations taken over or waiting for a human")?;
        let manager = SessionManager::start(
            db.clone(),
            inference,
            settings.database.group_commit_max,
            settings.realtime.resume_max,
            settings.realtime.outbound_queue,
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
        let state = web::Data::new(AppState {
            jwt: JwtKeys::new(&settings.auth)?,
            settings: Arc::new(settings.clone()),
            db,
            manager,
        });
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let route_settings = Arc::new(settings);
        let server = HttpServer::new(move || {
            let route_settings = route_settings.clone();
            App::new()
                .app_data(state.clone())
                .wrap(routes::json_errors())
                .wrap(RequestId)
                .configure(move |cfg| routes::configure(cfg, &route_settings))
        })
        .listen(listener)?
        .workers(workers)
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        .run();
        log::info!("listening on {address} (port {port})");
        Ok(Application { port, server })
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
    Ok(Db::start(pool, backend))
}
