//! The `switchboard` binary as an operator runs it: `check-db`, `migrate`, `user`, and the
//! start-up checks on configuration.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{
    assert_error, backend_name, expect_json, spawn_app, TestDatabase, CONFIG_DIR, JWT_SECRET,
};

/// Longest a command may take; far above what any takes, so a hang fails instead of blocking.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The binary with a clean environment: the repository's `config/`, `DATABASE_URL` and
/// whatever `vars` add. Nothing leaks in from the environment running the tests.
fn switchboard(db_url: &str, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.env_clear()
        .env("CONFIG_DIR", CONFIG_DIR)
        .env("DATABASE_URL", db_url)
        .env("LOG_LEVEL", "info");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `cmd` with `args`, `stdin` on standard input; waits at most [`COMMAND_TIMEOUT`].
fn run(mut cmd: Command, args: &[&str], stdin: &str) -> Output {
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting switchboard");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            panic!("switchboard {args:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Runs it off the async thread (a test server may be running on this runtime).
async fn run_async(cmd: Command, args: &[&str], stdin: &str) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(cmd, &args, &stdin)
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks the exit code (a signal, such as SIGSEGV at exit, has none) and returns stdout.
fn expect_exit(out: &Output, code: i32, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn migration_count() -> usize {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .count()
}

#[test]
fn check_db_and_migrate_report_the_database() {
    let db = TestDatabase::new();
    let all = migration_count();

    let out = run(switchboard(&db.url, &[]), &["check-db"], "");
    let stdout = expect_exit(&out, 0, "check-db before migrate");
    assert!(
        stdout.contains(&format!("backend: {}", backend_name())),
        "{stdout}"
    );
    assert!(stdout.contains("select 1: ok"), "{stdout}");
    assert!(
        stdout.contains(&format!("migrations: 0 applied, {all} pending")),
        "{stdout}"
    );
    assert!(stdout.contains("run `switchboard migrate`"), "{stdout}");
    // Nothing runs in the background against tables that are not there yet (PostgreSQL's
    // search-index merge once did, and logged a failure on every new database).
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("failed"), "{stderr}");
    assert!(
        stdout.contains("pool:") && stdout.contains("DB_MAX_OPEN_CONNS"),
        "{stdout}"
    );
    // The test URLs carry no password: none is shown as masked.
    assert!(!stdout.contains("***"), "{stdout}");
    assert!(stdout.contains("url: "), "{stdout}");

    let out = run(switchboard(&db.url, &[]), &["migrate"], "");
    let stdout = expect_exit(&out, 0, "migrate");
    assert_eq!(stdout.matches("applied ").count(), all, "{stdout}");
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("failed"), "{stderr}");
    let stdout = expect_exit(
        &run(switchboard(&db.url, &[]), &["migrate"], ""),
        0,
        "migrate again",
    );
    assert!(stdout.contains("nothing to apply"), "{stdout}");

    // The spellings operators type, several times each: every run must exit 0 by itself
    // (PostgreSQL's client library once made the process crash on its way out).
    for spelling in ["check-db", "-check-db", "--check-db"] {
        for _ in 0..4 {
            let out = run(
                switchboard(
                    &db.url,
                    &[("DB_MAX_OPEN_CONNS", "3"), ("DB_MAX_IDLE_CONNS", "1")],
                ),
                &[spelling],
                "",
            );
            let stdout = expect_exit(&out, 0, spelling);
            assert!(
                stdout.contains(&format!("migrations: {all} applied, 0 pending")),
                "{stdout}"
            );
            assert!(
                stdout.contains("max 3 (DB_MAX_OPEN_CONNS), idle 1"),
                "{stdout}"
            );
        }
    }
    for _ in 0..4 {
        expect_exit(
            &run(switchboard(&db.url, &[]), &["migrate"], ""),
            0,
            "migrate",
        );
    }
}

#[test]
fn check_db_fails_clearly_when_the_database_is_out_of_reach() {
    // Nothing listens on port 1.
    let out = run(
        switchboard("postgres://postgres@127.0.0.1:1/switchboard", &[]),
        &["check-db"],
        "",
    );
    expect_exit(&out, 1, "unreachable PostgreSQL");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: connecting to postgres://postgres@127.0.0.1:1/switchboard"),
        "{stderr}"
    );
    assert!(stderr.contains("is the database running"), "{stderr}");
    assert!(
        stderr.contains("Connection refused"),
        "the driver's reason: {stderr}"
    );

    // A folder that cannot be created: its parent is a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let url = format!("sqlite://{}/sub/chat.db", file.display());
    let out = run(switchboard(&url, &[]), &["check-db"], "");
    expect_exit(&out, 1, "SQLite in a folder that cannot be made");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("error: creating the folder"), "{stderr}");

    let out = run(
        switchboard("mysql://x@localhost/db", &[]),
        &["check-db"],
        "",
    );
    expect_exit(&out, 1, "unknown scheme");
    assert!(
        text(&out.stderr).contains("DATABASE_URL must start with"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn users_made_on_the_command_line_sign_in_and_can_be_locked_out() {
    let app = spawn_app().await;
    let cli = || switchboard(&app.db_url, &[("JWT_SECRET", JWT_SECRET)]);

    let out = run_async(
        cli(),
        &[
            "user",
            "create",
            "--email",
            "Ops@Example.com",
            "--role",
            "agent",
        ],
        "a long password\n",
    )
    .await;
    let stdout = expect_exit(&out, 0, "user create");
    assert!(stdout.contains("created agent ops@example.com"), "{stdout}");
    let signed = app.login("ops@example.com", "a long password").await;
    let me = expect_json(
        app.get("/api/v1/admin/users/me", &signed.access_token)
            .await,
        200,
    )
    .await;
    assert_eq!(me["role"], "agent");

    // Refused: the same email again, a short password, no password, an unknown role.
    for (args, stdin, code, says) in [
        (
            vec!["--email", "ops@example.com", "--role", "admin"],
            "another password\n",
            1,
            "exist",
        ),
        (
            vec!["--email", "short@example.com", "--role", "agent"],
            "short\n",
            1,
            "at least 8",
        ),
        (
            vec!["--email", "none@example.com", "--role", "agent"],
            "",
            1,
            "at least 8",
        ),
        (
            vec!["--email", "not-an-email", "--role", "agent"],
            "a long password\n",
            1,
            "not an email",
        ),
        (
            vec!["--email", "root@example.com", "--role", "root"],
            "a long password\n",
            2,
            "not a role",
        ),
    ] {
        let mut all = vec!["user", "create"];
        all.extend(args.iter().copied());
        let out = run_async(cli(), &all, stdin).await;
        expect_exit(&out, code, &format!("{all:?}"));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(says), "{all:?}: {stderr}");
    }
    assert_error(
        app.client
            .post(app.url("/api/v1/auth/login"))
            .json(&serde_json::json!({"email": "root@example.com", "password": "a long password"}))
            .send()
            .await
            .unwrap(),
        401,
        "invalid_credentials",
    )
    .await;

    // Locked out: the token already handed out stops working, and so does signing in.
    let out = run_async(
        cli(),
        &[
            "user",
            "set",
            "--email",
            "ops@example.com",
            "--active",
            "false",
        ],
        "",
    )
    .await;
    let stdout = expect_exit(&out, 0, "user set --active false");
    assert!(stdout.contains("inactive"), "{stdout}");
    assert_error(
        app.get("/api/v1/users/me", &signed.access_token).await,
        401,
        "account_disabled",
    )
    .await;
    assert_error(
        app.client
            .post(app.url("/api/v1/auth/login"))
            .json(&serde_json::json!({"email": "ops@example.com", "password": "a long password"}))
            .send()
            .await
            .unwrap(),
        401,
        "account_disabled",
    )
    .await;

    // Back in, as an admin.
    let out = run_async(
        cli(),
        &[
            "user",
            "set",
            "--email",
            "ops@example.com",
            "--active",
            "true",
            "--role",
            "admin",
        ],
        "",
    )
    .await;
    expect_exit(&out, 0, "user set --active true --role admin");
    let signed = app.login("ops@example.com", "a long password").await;
    let me = expect_json(app.get("/api/v1/users/me", &signed.access_token).await, 200).await;
    assert_eq!(me["role"], "admin");

    for (args, code, says) in [
        (
            vec!["--email", "nobody@example.com", "--active", "false"],
            1,
            "no user has the email",
        ),
        (
            vec!["--email", "ops@example.com"],
            1,
            "--role and/or --active",
        ),
        (
            vec!["--email", "ops@example.com", "--role", "superuser"],
            2,
            "not a role",
        ),
        (
            vec!["--email", "ops@example.com", "--active", "maybe"],
            2,
            "maybe",
        ),
    ] {
        let mut all = vec!["user", "set"];
        all.extend(args.iter().copied());
        let out = run_async(cli(), &all, "").await;
        expect_exit(&out, code, &format!("{all:?}"));
        assert!(
            text(&out.stderr).contains(says),
            "{all:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn production_refuses_to_start_without_a_strong_secret() {
    let db = TestDatabase::sqlite();
    for secret in [None, Some(""), Some("too-short-0123456789")] {
        let mut vars = vec![
            ("APP_ENV", "production"),
            ("PORT", "0"),
            ("HOST", "127.0.0.1"),
        ];
        if let Some(secret) = secret {
            vars.push(("JWT_SECRET", secret));
        }
        for command in ["serve", "check-db"] {
            let out = run(switchboard(&db.url, &vars), &[command], "");
            expect_exit(&out, 1, &format!("{command} with JWT_SECRET {secret:?}"));
            let stderr = text(&out.stderr);
            assert!(stderr.contains("JWT_SECRET"), "{stderr}");
            assert!(stderr.contains("openssl rand"), "{stderr}");
        }
    }
    // A strong one is accepted.
    let out = run(
        switchboard(
            &db.url,
            &[("APP_ENV", "production"), ("JWT_SECRET", JWT_SECRET)],
        ),
        &["check-db"],
        "",
    );
    expect_exit(&out, 0, "production with a strong secret");
}

#[test]
fn development_without_a_secret_says_so_in_the_log() {
    let db = TestDatabase::sqlite();
    let out = run(switchboard(&db.url, &[]), &["check-db"], "");
    expect_exit(&out, 0, "check-db");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(stderr.contains("JWT_SECRET is not set"), "{stderr}");
    // With a secret, no such warning.
    let out = run(
        switchboard(&db.url, &[("JWT_SECRET", JWT_SECRET)]),
        &["check-db"],
        "",
    );
    expect_exit(&out, 0, "check-db");
    assert!(
        !text(&out.stderr).contains("JWT_SECRET"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn unknown_configuration_keys_are_named() {
    let db = TestDatabase::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let defaults = std::fs::read_to_string(format!("{CONFIG_DIR}/default.toml")).unwrap();
    for (extra, named) in [
        ("\n[server]\nprot = 1\n", "prot"),
        ("\n[databse]\nurl = \"x\"\n", "databse"),
    ] {
        // Appending a section that exists already is a TOML error; replace the file instead
        // when the section is [server].
        let text_file = if extra.contains("[server]") {
            defaults.replacen("[server]\n", "[server]\nprot = 1\n", 1)
        } else {
            format!("{defaults}{extra}")
        };
        std::fs::write(dir.path().join("default.toml"), text_file).unwrap();
        let mut cmd = switchboard(&db.url, &[]);
        cmd.env("CONFIG_DIR", dir.path());
        let out = run(cmd, &["check-db"], "");
        expect_exit(&out, 1, &format!("unknown key {named}"));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(named), "{stderr}");
    }
    // A bad value names its variable.
    let out = run(
        switchboard(&db.url, &[("DB_MAX_OPEN_CONNS", "lots")]),
        &["check-db"],
        "",
    );
    expect_exit(&out, 1, "DB_MAX_OPEN_CONNS=lots");
    assert!(
        text(&out.stderr).contains("DB_MAX_OPEN_CONNS"),
        "{}",
        text(&out.stderr)
    );
}

/// `DB_SQLITE_SYNCHRONOUS` takes `normal` or `full`. Anything else is refused with what it
/// takes, before the database is touched.
#[test]
fn sqlite_synchronous_takes_normal_or_full() {
    let db = TestDatabase::sqlite();
    let file = db.url.trim_start_matches("sqlite://").to_string();
    let out = run(
        switchboard(&db.url, &[("DB_SQLITE_SYNCHRONOUS", "off")]),
        &["check-db"],
        "",
    );
    expect_exit(&out, 1, "DB_SQLITE_SYNCHRONOUS=off");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("DB_SQLITE_SYNCHRONOUS must be `normal` or `full`, got `off`"),
        "{stderr}"
    );
    assert!(
        !std::path::Path::new(&file).exists(),
        "the refused run made the database"
    );

    let out = run(
        switchboard(&db.url, &[("DB_SQLITE_SYNCHRONOUS", "full")]),
        &["check-db"],
        "",
    );
    expect_exit(&out, 0, "DB_SQLITE_SYNCHRONOUS=full");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let db = TestDatabase::sqlite();
    let out = run(
        switchboard(&db.url, &[("LOG_FORMAT", "json")]),
        &["check-db"],
        "",
    );
    expect_exit(&out, 0, "check-db with LOG_FORMAT=json");
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in lines {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(entry[field].is_string(), "{field} missing: {line}");
        }
    }
}
