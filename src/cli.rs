//! What each sub-command does. Each returns the process exit code and prints what an operator
//! needs; errors carry the context of the step that failed.

use std::io::BufRead;
use std::time::Instant;

use anyhow::Context;

use crate::actors::persistence::Db;
use crate::auth::password;
use crate::config::Settings;
use crate::db::models::{now, user, Role};
use crate::db::{self, DbUrl};
use crate::startup::{connect, Application};
use crate::telemetry;

fn load() -> anyhow::Result<Settings> {
    let settings = Settings::load()?;
    telemetry::init(&settings.log);
    for warning in settings.warnings() {
        log::warn!("{warning}");
    }
    Ok(settings)
}

fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

pub async fn serve() -> i32 {
    report(
        async {
            let settings = load()?;
            log::info!(
                "starting switchboard {} ({})",
                env!("CARGO_PKG_VERSION"),
                settings.environment.as_str()
            );
            let app = Application::build(settings).await?;
            app.run_until_signalled().await?;
            log::info!("stopped");
            Ok(())
        }
        .await,
    )
}

pub async fn migrate() -> i32 {
    report(
        async {
            let settings = load()?;
            let db = connect(&settings).await?;
            let applied = db.run(|c| Ok(db::run_migrations(c))).await??;
            if applied.is_empty() {
                println!("migrations: nothing to apply");
            }
            for name in applied {
                println!("applied {name}");
            }
            Ok(())
        }
        .await,
    )
}

pub async fn check_db() -> i32 {
    report(async {
        let settings = load()?;
        let url = DbUrl::parse(settings.database.url.expose())?;
        println!("backend: {}", url.backend.as_str());
        println!("url: {}", url.redacted());
        let db = connect(&settings).await?;
        let started = Instant::now();
        db.run(|c| {
            use diesel::connection::SimpleConnection;
            c.batch_execute("SELECT 1")?;
            Ok(())
        })
        .await
        .context("running SELECT 1")?;
        println!("select 1: ok ({:.1} ms)", started.elapsed().as_secs_f64() * 1000.0);
        let (open, max) = db.pool_state();
        println!(
            "pool: {open} open, max {max} (DB_MAX_OPEN_CONNS), idle {} (DB_MAX_IDLE_CONNS), lifetime {} (DB_CONN_MAX_LIFETIME)",
            settings.database.max_idle_conns, settings.database.conn_max_lifetime
        );
        let (applied, pending) = db.run(|c| Ok(db::migration_state(c))).await??;
        println!("migrations: {applied} applied, {} pending", pending.len());
        for name in &pending {
            println!("  pending: {name} (run `switchboard migrate`)");
        }
        Ok(())
    }
    .await)
}

async fn migrated_db() -> anyhow::Result<Db> {
    let settings = load()?;
    let db = connect(&settings).await?;
    db.run(|c| Ok(db::run_migrations(c))).await??;
    Ok(db)
}

pub async fn create_user(email: String, role: Role) -> i32 {
    report(
        async {
            let email = email.trim().to_lowercase();
            anyhow::ensure!(
                email.contains('@') && email.len() <= 254,
                "`{email}` is not an email address"
            );
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            let secret = line.trim_end_matches(['\r', '\n']).to_string();
            password::check_strength(&secret).map_err(anyhow::Error::msg)?;
            let hash = password::hash(&secret)?;
            let db = migrated_db().await?;
            let id = uuid::Uuid::new_v4().to_string();
            let mail = email.clone();
            let created = db
                .run(move |c| {
                    let t = now();
                    Ok(user::insert(
                        c,
                        &user::NewUser {
                            id: &id,
                            email: &mail,
                            password_hash: Some(&hash),
                            role: role.as_str(),
                            is_active: true,
                            is_guest: false,
                            created_at: t,
                            updated_at: t,
                        },
                    )?)
                })
                .await
                .with_context(|| format!("creating {email} (does that email exist already?)"))?;
            println!(
                "created {} {} (id {})",
                created.role, created.email, created.id
            );
            Ok(())
        }
        .await,
    )
}

pub async fn set_user(email: String, role: Option<Role>, active: Option<bool>) -> i32 {
    report(
        async {
            anyhow::ensure!(
                role.is_some() || active.is_some(),
                "say what to change: --role and/or --active"
            );
            let db = migrated_db().await?;
            let mail = email.trim().to_lowercase();
            let updated = db
                .run(move |c| Ok(user::update(c, &mail, role, active)?))
                .await?
                .with_context(|| format!("no user has the email {email}"))?;
            println!(
                "{}: role {}, {}",
                updated.email,
                updated.role,
                if updated.is_active {
                    "active"
                } else {
                    "inactive"
                }
            );
            Ok(())
        }
        .await,
    )
}
