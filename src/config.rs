//! Typed settings.
//!
//! Layers, each overriding the one before: the defaults in this file (kept equal to
//! `config/default.toml` by a test), `config/default.toml`, `config/<APP_ENV>.toml`, then
//! environment variables. Files are read from `CONFIG_DIR` (default `config/`) when present and
//! otherwise from the copies embedded in the binary, so the binary runs from any directory.
//! Unknown keys are an error that names the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer, Serialize};

const EMBEDDED_DEFAULT: &str = include_str!("../config/default.toml");
const EMBEDDED_PRODUCTION: &str = include_str!("../config/production.toml");

/// Shortest `JWT_SECRET` accepted outside development mode.
pub const MIN_SECRET_BYTES: usize = 32;

/// The secret used in development mode when none is configured. Never accepted in production.
const DEVELOPMENT_SECRET: &str = "switchboard-development-secret-do-not-use-in-production";

/// Which deployment this process is: picks `config/<env>.toml` and development conveniences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Environment {
    #[default]
    Development,
    Production,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Production => "production",
        }
    }
}

impl FromStr for Environment {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "" | "development" | "dev" | "local" => Ok(Environment::Development),
            "production" | "prod" => Ok(Environment::Production),
            other => bail!("APP_ENV must be `development` or `production`, got `{other}`"),
        }
    }
}

/// Everything the server reads at start-up.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// HTTP listener and request limits.
    pub server: ServerSettings,
    /// Where history is stored and how the connection pool is sized.
    pub database: DatabaseSettings,
    /// Token signing and lifetimes.
    pub auth: AuthSettings,
    /// Log verbosity and format.
    pub log: LogSettings,
    /// Conversation limits.
    pub chat: ChatSettings,
    /// WebSocket connections.
    pub realtime: RealtimeSettings,
    /// The AI consultant.
    pub ai: AiSettings,
    /// Flood protection.
    pub rate_limit: RateLimitSettings,
    /// Not read from files: set from `APP_ENV`.
    #[serde(skip)]
    pub environment: Environment,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            auth: AuthSettings::default(),
            log: LogSettings::default(),
            chat: ChatSettings::default(),
            realtime: RealtimeSettings::default(),
            ai: AiSettings::default(),
            rate_limit: RateLimitSettings::default(),
            environment: Environment::Development,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to bind (`HOST`).
    pub host: String,
    /// Port to bind (`PORT`); 0 picks a free port.
    pub port: u16,
    /// Largest accepted HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// On SIGTERM or SIGINT: the longest wait for answers to be stored and sockets closed,
    /// and then again for open HTTP requests to finish (`SHUTDOWN_TIMEOUT`).
    pub shutdown_timeout: HumanDuration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 64 * 1024,
            workers: 0,
            shutdown_timeout: HumanDuration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://path/to/file.db` or `postgres://user@host/db` (`DATABASE_URL`).
    pub url: Secret,
    /// Largest number of open connections (`DB_MAX_OPEN_CONNS`).
    pub max_open_conns: u32,
    /// Connections kept open while idle (`DB_MAX_IDLE_CONNS`).
    pub max_idle_conns: u32,
    /// A connection older than this is closed and replaced (`DB_CONN_MAX_LIFETIME`).
    pub conn_max_lifetime: HumanDuration,
    /// How long a request waits for a free connection before failing.
    pub acquire_timeout: HumanDuration,
    /// SQLite only: how long a writer waits for the lock.
    pub busy_timeout: HumanDuration,
    /// SQLite only: `normal` syncs the WAL every 50 ms, so a power cut or an OS crash can lose
    /// the last ~50 ms of acknowledged messages; `full` syncs every commit before it is
    /// acknowledged (`DB_SQLITE_SYNCHRONOUS`).
    pub sqlite_synchronous: String,
    /// Most messages stored in one transaction (group commit); 1 turns grouping off.
    pub group_commit_max: usize,
    /// PostgreSQL only: the most group-commit transactions that run at once, each on a writer
    /// of its own, a second one only while the first falls behind (`DB_WRITE_LANES`); 0 picks
    /// the number of CPU cores, at most half of `max_open_conns` and at most 8. SQLite has one.
    pub write_lanes: usize,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: Secret::new("sqlite://data/chat_history.db"),
            max_open_conns: 8,
            max_idle_conns: 2,
            conn_max_lifetime: HumanDuration::from_secs(30 * 60),
            acquire_timeout: HumanDuration::from_secs(5),
            busy_timeout: HumanDuration::from_secs(5),
            sqlite_synchronous: "normal".into(),
            group_commit_max: 256,
            write_lanes: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// HMAC key for tokens (`JWT_SECRET`); at least 32 bytes outside development.
    pub jwt_secret: Secret,
    /// Lifetime of an access token (`JWT_EXPIRY`).
    pub jwt_expiry: HumanDuration,
    /// Lifetime of a refresh token.
    pub refresh_expiry: HumanDuration,
    /// `iss` claim written and required.
    pub issuer: String,
    /// `aud` claim written and required.
    pub audience: String,
    /// Signing algorithm: HS256, HS384 or HS512.
    pub algorithm: String,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            jwt_secret: Secret::new(""),
            jwt_expiry: HumanDuration::from_secs(24 * 3600),
            refresh_expiry: HumanDuration::from_secs(30 * 24 * 3600),
            issuer: "switchboard".into(),
            audience: "switchboard".into(),
            algorithm: "HS256".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `debug`, `info`, `warn` or `error`, or an env_logger filter (`LOG_LEVEL`).
    pub level: String,
    /// `text` or `json`, one object per line (`LOG_FORMAT`).
    pub format: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatSettings {
    /// Largest message a user may send, in bytes of UTF-8.
    pub max_message_bytes: usize,
    /// Messages or conversations per page when the client does not say.
    pub page_size: i64,
    /// Most messages or conversations one page may hold.
    pub max_page_size: i64,
    /// How long after a soft delete staff may still restore a conversation.
    pub restore_window: HumanDuration,
    /// How long a customer who asked for a human waits for an agent before being told none
    /// is free; the AI answers again then.
    pub human_wait: HumanDuration,
    /// Most conversations in the snapshot a dashboard gets when it connects.
    pub desk_snapshot_max: i64,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings {
            max_message_bytes: 8 * 1024,
            page_size: 50,
            max_page_size: 200,
            restore_window: HumanDuration::from_secs(7 * 24 * 3600),
            human_wait: HumanDuration::from_secs(120),
            desk_snapshot_max: 200,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeSettings {
    /// How often the server pings each socket.
    pub heartbeat_interval: HumanDuration,
    /// A socket silent this long (no frame, no pong) is closed.
    pub client_timeout: HumanDuration,
    /// Frames waiting to be written to one socket; a client further behind is disconnected.
    pub outbound_queue: usize,
    /// Largest WebSocket message accepted, in bytes, one frame or fragments joined; a larger
    /// one closes the socket (1009).
    pub max_frame_bytes: usize,
    /// Stored messages per replay page after `resume` (pages follow one another).
    pub resume_max: i64,
    /// How often the accounts behind live sockets are checked; a deactivated account or a
    /// changed role loses its sockets at the next check.
    pub account_check_interval: HumanDuration,
    /// Messages one connection may have sent and not yet had acknowledged; a `send` beyond
    /// it is refused with `too_many_pending`.
    pub max_pending_acks: usize,
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        RealtimeSettings {
            heartbeat_interval: HumanDuration::from_secs(10),
            client_timeout: HumanDuration::from_secs(30),
            outbound_queue: 256,
            max_frame_bytes: 64 * 1024,
            resume_max: 1000,
            account_check_interval: HumanDuration::from_secs(5),
            max_pending_acks: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AiSettings {
    /// Who answers: `bedrock`, `openai` (any OpenAI-compatible server) or `demo` (`AI_PROVIDER`).
    pub provider: String,
    /// The model id sent to the provider; required for bedrock and openai (`AI_MODEL`).
    pub model: String,
    /// Further model ids of the same provider an admin may switch to
    /// (`AI_MODELS`, comma-separated).
    pub models: Vec<String>,
    /// A second provider tried when the first cannot answer; empty for none
    /// (`AI_FALLBACK_PROVIDER`).
    pub fallback_provider: String,
    /// The fallback provider's model; empty means `model` (`AI_FALLBACK_MODEL`).
    pub fallback_model: String,
    /// Sent to the model before the conversation (`AI_SYSTEM_PROMPT`).
    pub system_prompt: String,
    /// Most characters of conversation sent to the model; older turns are left out first
    /// (`AI_HISTORY_CHARS`).
    pub history_chars: usize,
    /// Inference workers (actors) answering in parallel; each runs many streams.
    pub workers: usize,
    /// Stored messages given to the model as the conversation so far.
    pub history_messages: i64,
    /// The demo model's pause between tokens.
    pub demo_token_delay: HumanDuration,
    /// Fault injection for tests: when not empty, the demo model panics on a customer message
    /// containing this text. Leave empty in production.
    pub demo_panic_trigger: String,
    /// Base URL of the OpenAI-compatible API, up to and including `/v1` (`OPENAI_BASE_URL`).
    pub openai_base_url: String,
    /// Bearer key for the OpenAI-compatible API; empty sends none (`OPENAI_API_KEY`).
    pub openai_api_key: Secret,
    /// Bedrock region; empty uses the AWS chain (`AWS_REGION`).
    pub aws_region: String,
    /// Bedrock endpoint override; empty uses the AWS default (`AWS_ENDPOINT_URL_BEDROCK_RUNTIME`).
    pub bedrock_endpoint_url: String,
    /// Static Bedrock keys; empty uses the AWS credential chain (environment, profile, role).
    pub bedrock_access_key_id: Secret,
    /// Goes with `bedrock_access_key_id`.
    pub bedrock_secret_access_key: Secret,
    /// Tries per provider for one answer, the first included (`AI_RETRY_ATTEMPTS`). Only
    /// throttling, timeouts, 5xx and unreachable endpoints are tried again.
    pub retry_attempts: u32,
    /// Pause before the first retry; doubled for each further one, with jitter
    /// (`AI_RETRY_DELAY`).
    pub retry_delay: HumanDuration,
    /// Longest wait for the first piece of an answer (`AI_FIRST_TOKEN_TIMEOUT`).
    pub first_token_timeout: HumanDuration,
    /// Longest time one answer may take in all (`AI_ANSWER_TIMEOUT`).
    pub answer_timeout: HumanDuration,
    /// Failures in a row that open a provider's circuit breaker (`AI_BREAKER_FAILURES`).
    pub breaker_failures: u32,
    /// How long an open breaker waits before letting one trial call through
    /// (`AI_BREAKER_COOLDOWN`).
    pub breaker_cooldown: HumanDuration,
    /// Answer an identical context from the cache instead of the provider (`ENABLE_AI_CACHE`).
    pub enable_cache: bool,
    /// How long a cached answer is used (`AI_CACHE_TTL`).
    pub cache_ttl: HumanDuration,
    /// A burst of this many customer messages starts the AI turn at once (`AI_BATCH_SIZE`).
    pub batch_size: usize,
    /// Customer messages this close together become one AI turn; 0 answers each message at
    /// once (`AI_BATCH_TIMEOUT`).
    pub batch_timeout: HumanDuration,
}

impl Default for AiSettings {
    fn default() -> Self {
        AiSettings {
            provider: "demo".into(),
            model: String::new(),
            models: Vec::new(),
            fallback_provider: String::new(),
            fallback_model: String::new(),
            system_prompt: "You are a helpful, concise customer support consultant. \
                            If you cannot help, say that a human agent can take over."
                .into(),
            history_chars: 12_000,
            workers: 2,
            history_messages: 20,
            demo_token_delay: HumanDuration::from_millis(30),
            demo_panic_trigger: String::new(),
            openai_base_url: "http://127.0.0.1:11434/v1".into(),
            openai_api_key: Secret::new(""),
            aws_region: String::new(),
            bedrock_endpoint_url: String::new(),
            bedrock_access_key_id: Secret::new(""),
            bedrock_secret_access_key: Secret::new(""),
            retry_attempts: 3,
            retry_delay: HumanDuration::from_millis(500),
            first_token_timeout: HumanDuration::from_secs(30),
            answer_timeout: HumanDuration::from_secs(120),
            breaker_failures: 5,
            breaker_cooldown: HumanDuration::from_secs(30),
            enable_cache: false,
            cache_ttl: HumanDuration::from_secs(3600),
            batch_size: 10,
            batch_timeout: HumanDuration::from_millis(0),
        }
    }
}

/// Token buckets: each allows `burst` at once, refilled at the given rate; a rate of 0
/// turns that limit off.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Frames of any kind one WebSocket may send per second, on average.
    pub ws_frames_per_second: u32,
    /// Frames one WebSocket may send at once above that rate.
    pub ws_frame_burst: u32,
    /// Refused frames in a row after which a flooding socket is closed.
    pub ws_flood_close_after: u32,
    /// Messages one user may post per minute, over WebSocket and HTTP together.
    pub messages_per_minute: u32,
    /// Messages one user may post at once above that rate.
    pub message_burst: u32,
    /// Sign-in requests (login, register, guest, refresh) one IP address may make per minute.
    pub auth_per_minute: u32,
    /// Sign-in requests one IP address may make at once above that rate.
    pub auth_burst: u32,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            ws_frames_per_second: 50,
            ws_frame_burst: 200,
            ws_flood_close_after: 100,
            messages_per_minute: 600,
            message_burst: 200,
            auth_per_minute: 120,
            auth_burst: 600,
        }
    }
}

/// How an environment variable's text becomes a TOML value.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    /// Comma-separated; blanks around items are dropped.
    List,
    /// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`.
    Bool,
}

/// Operator-facing environment variables and the key each one sets.
const ENV_KEYS: &[(&str, &str, Kind)] = &[
    ("HOST", "server.host", Kind::Str),
    ("PORT", "server.port", Kind::Int),
    ("MAX_BODY_BYTES", "server.max_body_bytes", Kind::Int),
    ("HTTP_WORKERS", "server.workers", Kind::Int),
    ("SHUTDOWN_TIMEOUT", "server.shutdown_timeout", Kind::Str),
    ("DATABASE_URL", "database.url", Kind::Str),
    ("DB_MAX_OPEN_CONNS", "database.max_open_conns", Kind::Int),
    ("DB_MAX_IDLE_CONNS", "database.max_idle_conns", Kind::Int),
    (
        "DB_CONN_MAX_LIFETIME",
        "database.conn_max_lifetime",
        Kind::Str,
    ),
    ("DB_ACQUIRE_TIMEOUT", "database.acquire_timeout", Kind::Str),
    ("DB_BUSY_TIMEOUT", "database.busy_timeout", Kind::Str),
    (
        "DB_SQLITE_SYNCHRONOUS",
        "database.sqlite_synchronous",
        Kind::Str,
    ),
    ("JWT_SECRET", "auth.jwt_secret", Kind::Str),
    ("JWT_EXPIRY", "auth.jwt_expiry", Kind::Str),
    ("JWT_REFRESH_EXPIRY", "auth.refresh_expiry", Kind::Str),
    ("JWT_ISSUER", "auth.issuer", Kind::Str),
    ("JWT_AUDIENCE", "auth.audience", Kind::Str),
    ("JWT_ALGORITHM", "auth.algorithm", Kind::Str),
    ("LOG_LEVEL", "log.level", Kind::Str),
    ("LOG_FORMAT", "log.format", Kind::Str),
    ("MAX_MESSAGE_BYTES", "chat.max_message_bytes", Kind::Int),
    ("RESTORE_WINDOW", "chat.restore_window", Kind::Str),
    ("HUMAN_WAIT", "chat.human_wait", Kind::Str),
    ("DESK_SNAPSHOT_MAX", "chat.desk_snapshot_max", Kind::Int),
    (
        "ACCOUNT_CHECK_INTERVAL",
        "realtime.account_check_interval",
        Kind::Str,
    ),
    (
        "DB_GROUP_COMMIT_MAX",
        "database.group_commit_max",
        Kind::Int,
    ),
    ("DB_WRITE_LANES", "database.write_lanes", Kind::Int),
    (
        "WS_HEARTBEAT_INTERVAL",
        "realtime.heartbeat_interval",
        Kind::Str,
    ),
    ("WS_CLIENT_TIMEOUT", "realtime.client_timeout", Kind::Str),
    ("WS_OUTBOUND_QUEUE", "realtime.outbound_queue", Kind::Int),
    ("WS_MAX_FRAME_BYTES", "realtime.max_frame_bytes", Kind::Int),
    (
        "WS_MAX_PENDING_ACKS",
        "realtime.max_pending_acks",
        Kind::Int,
    ),
    (
        "RATE_LIMIT_WS_FRAMES_PER_SECOND",
        "rate_limit.ws_frames_per_second",
        Kind::Int,
    ),
    (
        "RATE_LIMIT_WS_FRAME_BURST",
        "rate_limit.ws_frame_burst",
        Kind::Int,
    ),
    (
        "RATE_LIMIT_WS_FLOOD_CLOSE_AFTER",
        "rate_limit.ws_flood_close_after",
        Kind::Int,
    ),
    (
        "RATE_LIMIT_MESSAGES_PER_MINUTE",
        "rate_limit.messages_per_minute",
        Kind::Int,
    ),
    (
        "RATE_LIMIT_MESSAGE_BURST",
        "rate_limit.message_burst",
        Kind::Int,
    ),
    (
        "RATE_LIMIT_AUTH_PER_MINUTE",
        "rate_limit.auth_per_minute",
        Kind::Int,
    ),
    ("RATE_LIMIT_AUTH_BURST", "rate_limit.auth_burst", Kind::Int),
    ("AI_WORKERS", "ai.workers", Kind::Int),
    ("AI_HISTORY_MESSAGES", "ai.history_messages", Kind::Int),
    ("AI_DEMO_TOKEN_DELAY", "ai.demo_token_delay", Kind::Str),
    ("AI_PROVIDER", "ai.provider", Kind::Str),
    ("AI_MODEL", "ai.model", Kind::Str),
    ("AI_MODELS", "ai.models", Kind::List),
    ("AI_FALLBACK_PROVIDER", "ai.fallback_provider", Kind::Str),
    ("AI_FALLBACK_MODEL", "ai.fallback_model", Kind::Str),
    ("AI_SYSTEM_PROMPT", "ai.system_prompt", Kind::Str),
    ("AI_HISTORY_CHARS", "ai.history_chars", Kind::Int),
    ("OPENAI_BASE_URL", "ai.openai_base_url", Kind::Str),
    ("OPENAI_API_KEY", "ai.openai_api_key", Kind::Str),
    ("AWS_REGION", "ai.aws_region", Kind::Str),
    (
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
        "ai.bedrock_endpoint_url",
        Kind::Str,
    ),
    ("AI_RETRY_ATTEMPTS", "ai.retry_attempts", Kind::Int),
    ("AI_RETRY_DELAY", "ai.retry_delay", Kind::Str),
    (
        "AI_FIRST_TOKEN_TIMEOUT",
        "ai.first_token_timeout",
        Kind::Str,
    ),
    ("AI_ANSWER_TIMEOUT", "ai.answer_timeout", Kind::Str),
    ("AI_BREAKER_FAILURES", "ai.breaker_failures", Kind::Int),
    ("AI_BREAKER_COOLDOWN", "ai.breaker_cooldown", Kind::Str),
    ("ENABLE_AI_CACHE", "ai.enable_cache", Kind::Bool),
    ("AI_CACHE_TTL", "ai.cache_ttl", Kind::Str),
    ("AI_BATCH_SIZE", "ai.batch_size", Kind::Int),
    ("AI_BATCH_TIMEOUT", "ai.batch_timeout", Kind::Str),
];

impl Settings {
    /// Loads settings from files and the process environment.
    pub fn load() -> anyhow::Result<Settings> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(&env)
    }

    /// Loads settings from files and the given variables (tests pass their own).
    pub fn load_from(vars: &[(String, String)]) -> anyhow::Result<Settings> {
        let get = |name: &str| {
            vars.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let environment: Environment = get("APP_ENV").unwrap_or("development").parse()?;
        let dir = PathBuf::from(get("CONFIG_DIR").unwrap_or("config"));

        let mut merged = parse_layer(
            &read_layer(&dir, "default.toml", Some(EMBEDDED_DEFAULT))?,
            "default.toml",
        )?;
        let env_file = format!("{}.toml", environment.as_str());
        let embedded = match environment {
            Environment::Production => Some(EMBEDDED_PRODUCTION),
            Environment::Development => None,
        };
        let overrides = read_layer(&dir, &env_file, embedded)?;
        if !overrides.is_empty() {
            merge(&mut merged, parse_layer(&overrides, &env_file)?);
        }
        for (name, path, kind) in ENV_KEYS {
            if let Some(raw) = get(name) {
                let value = env_value(name, raw, *kind)?;
                set_path(&mut merged, path, value);
            }
        }

        let mut settings: Settings = toml::Value::Table(merged)
            .try_into()
            .context("reading configuration")?;
        settings.environment = environment;
        settings.validate()?;
        Ok(settings)
    }

    /// Start-up checks that a config file cannot express.
    fn validate(&mut self) -> anyhow::Result<()> {
        let secret = self.auth.jwt_secret.expose();
        if self.environment != Environment::Development && secret.len() < MIN_SECRET_BYTES {
            bail!(
                "JWT_SECRET is {} ({} bytes); outside development it must be at least {MIN_SECRET_BYTES} bytes. \
                 Make one with `openssl rand -base64 48` and set JWT_SECRET to it.",
                if secret.is_empty() { "not set" } else { "too short" },
                secret.len()
            );
        }
        // Warned about by `warnings()` once the logger is up: none is installed yet here.
        if secret.is_empty() {
            self.auth.jwt_secret = Secret::new(DEVELOPMENT_SECRET);
        }
        match self.auth.algorithm.as_str() {
            "HS256" | "HS384" | "HS512" => {}
            other => bail!("auth.algorithm must be HS256, HS384 or HS512, got `{other}`"),
        }
        match self.database.sqlite_synchronous.as_str() {
            "normal" | "full" => {}
            other => bail!("DB_SQLITE_SYNCHRONOUS must be `normal` or `full`, got `{other}`"),
        }
        match self.log.format.as_str() {
            "text" | "json" => {}
            other => bail!("LOG_FORMAT must be `text` or `json`, got `{other}`"),
        }
        if self.realtime.outbound_queue == 0
            || self.ai.workers == 0
            || self.database.group_commit_max == 0
        {
            bail!("WS_OUTBOUND_QUEUE, AI_WORKERS and DB_GROUP_COMMIT_MAX must be at least 1");
        }
        for (key, name) in [
            ("AI_PROVIDER", &self.ai.provider),
            ("AI_FALLBACK_PROVIDER", &self.ai.fallback_provider),
        ] {
            match name.as_str() {
                "bedrock" | "openai" | "demo" => {}
                "" if key == "AI_FALLBACK_PROVIDER" => {}
                other => bail!("{key} must be bedrock, openai or demo, got `{other}`"),
            }
        }
        if self.database.max_open_conns == 0 {
            bail!("DB_MAX_OPEN_CONNS must be at least 1");
        }
        if self.database.max_idle_conns > self.database.max_open_conns {
            self.database.max_idle_conns = self.database.max_open_conns;
        }
        Ok(())
    }

    /// What an operator should hear about these settings at start-up; logged by the caller once
    /// the logger is installed (settings are loaded before it, since they configure it).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.auth.jwt_secret.expose() == DEVELOPMENT_SECRET {
            warnings.push(
                "JWT_SECRET is not set; tokens are signed with the fixed development secret, \
                 which is refused outside development (make one with `openssl rand -base64 48`)"
                    .to_string(),
            );
        }
        warnings
    }

    pub fn is_development(&self) -> bool {
        self.environment == Environment::Development
    }
}

fn read_layer(dir: &Path, name: &str, embedded: Option<&str>) -> anyhow::Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(embedded.unwrap_or_default().to_string())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn parse_layer(text: &str, name: &str) -> anyhow::Result<toml::Table> {
    text.parse::<toml::Table>()
        .with_context(|| format!("parsing config/{name}"))
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let (section, key) = path.split_once('.').unwrap_or(("", path));
    let section = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = section {
        t.insert(key.to_string(), value);
    }
}

fn env_value(name: &str, raw: &str, kind: Kind) -> anyhow::Result<toml::Value> {
    Ok(match kind {
        Kind::Str => toml::Value::String(raw.to_string()),
        Kind::Bool => toml::Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" | "" => false,
            _ => bail!("{name} must be true or false, got `{raw}`"),
        }),
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        Kind::Int => toml::Value::Integer(
            raw.trim()
                .parse()
                .with_context(|| format!("{name} must be a whole number, got `{raw}`"))?,
        ),
    })
}

/// A value that must not appear in logs or debug output.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A duration written as `250ms`, `2s`, `5m`, `24h`, `7d` or a bare number of seconds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
    pub const fn from_millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let (n, unit) = if !ms.is_multiple_of(1000) {
            (ms, "ms")
        } else if ms.is_multiple_of(86_400_000) && ms > 0 {
            (ms / 86_400_000, "d")
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            (ms / 3_600_000, "h")
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            (ms / 60_000, "m")
        } else {
            (ms / 1000, "s")
        };
        write!(f, "{n}{unit}")
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{s}` is not a duration (examples: 500ms, 2s, 5m, 24h)"))?;
        let ms = match unit.trim() {
            "ms" => n,
            "" | "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            _ => return Err(format!("`{s}` has an unknown unit (use ms, s, m, h or d)")),
        };
        Ok(HumanDuration(Duration::from_millis(ms)))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(HumanDuration::from_secs(s)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v = vec![(
            "CONFIG_DIR".to_string(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/config").to_string(),
        )];
        v.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        v
    }

    #[test]
    fn default_toml_equals_code_defaults() {
        let from_file: Settings =
            toml::from_str(EMBEDDED_DEFAULT).expect("config/default.toml parses");
        assert_eq!(from_file, Settings::default());
        let on_disk =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
                .unwrap();
        assert_eq!(on_disk, EMBEDDED_DEFAULT);
    }

    #[test]
    fn every_env_key_names_a_documented_key() {
        let table: toml::Table = EMBEDDED_DEFAULT.parse().unwrap();
        for (name, path, _) in ENV_KEYS {
            let (section, key) = path.split_once('.').unwrap();
            let found = table.get(section).and_then(|s| s.get(key));
            assert!(
                found.is_some(),
                "{name} sets {path}, which config/default.toml does not document"
            );
            assert!(
                EMBEDDED_DEFAULT.contains(name),
                "config/default.toml does not mention {name}"
            );
        }
    }

    #[test]
    fn environment_variables_override_files() {
        let s = Settings::load_from(&vars(&[
            ("DATABASE_URL", "postgres://x@localhost/db"),
            ("DB_MAX_OPEN_CONNS", "25"),
            ("DB_CONN_MAX_LIFETIME", "5m"),
            ("JWT_EXPIRY", "24h"),
            ("LOG_FORMAT", "json"),
            ("PORT", "9999"),
            ("DB_SQLITE_SYNCHRONOUS", "full"),
        ]))
        .unwrap();
        assert_eq!(s.database.sqlite_synchronous, "full");
        assert_eq!(s.database.url.expose(), "postgres://x@localhost/db");
        assert_eq!(s.database.max_open_conns, 25);
        assert_eq!(s.database.conn_max_lifetime.get(), Duration::from_secs(300));
        assert_eq!(s.auth.jwt_expiry.get(), Duration::from_secs(86400));
        assert_eq!(s.log.format, "json");
        assert_eq!(s.server.port, 9999);
    }

    #[test]
    fn production_binds_all_interfaces_and_demands_a_strong_secret() {
        let err = Settings::load_from(&vars(&[("APP_ENV", "production")])).unwrap_err();
        assert!(format!("{err:#}").contains("openssl rand"), "{err:#}");
        let err = Settings::load_from(&vars(&[("APP_ENV", "production"), ("JWT_SECRET", "short")]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("too short"), "{err:#}");
        let s = Settings::load_from(&vars(&[
            ("APP_ENV", "production"),
            ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ]))
        .unwrap();
        assert_eq!(s.server.host, "0.0.0.0");
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default.toml"), "[server]\nprot = 1\n").unwrap();
        let err = Settings::load_from(&[("CONFIG_DIR".into(), dir.path().display().to_string())])
            .unwrap_err();
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let err = Settings::load_from(&vars(&[("DB_MAX_OPEN_CONNS", "many")])).unwrap_err();
        assert!(format!("{err:#}").contains("DB_MAX_OPEN_CONNS"), "{err:#}");
        let err = Settings::load_from(&vars(&[("JWT_EXPIRY", "soon")])).unwrap_err();
        assert!(format!("{err:#}").contains("soon"), "{err:#}");
        let err = Settings::load_from(&vars(&[("DB_SQLITE_SYNCHRONOUS", "off")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("DB_SQLITE_SYNCHRONOUS must be `normal` or `full`"),
            "{err:#}"
        );
    }

    #[test]
    fn ai_variables_are_read_and_checked() {
        let s = Settings::load_from(&vars(&[
            ("AI_PROVIDER", "openai"),
            ("AI_MODEL", "llama3.2"),
            ("AI_MODELS", " a, b ,,c "),
            ("ENABLE_AI_CACHE", "yes"),
            ("AI_RETRY_ATTEMPTS", "5"),
            ("AI_RETRY_DELAY", "250ms"),
            ("OPENAI_API_KEY", "sk-secret-value"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", "http://127.0.0.1:4566"),
        ]))
        .unwrap();
        assert_eq!(s.ai.aws_region, "eu-west-1");
        assert_eq!(s.ai.bedrock_endpoint_url, "http://127.0.0.1:4566");
        assert_eq!(s.ai.provider, "openai");
        assert_eq!(s.ai.models, ["a", "b", "c"]);
        assert!(s.ai.enable_cache);
        assert_eq!(s.ai.retry_attempts, 5);
        assert_eq!(s.ai.retry_delay.get(), Duration::from_millis(250));
        assert!(!format!("{s:?}").contains("sk-secret-value"));

        let err = Settings::load_from(&vars(&[("AI_PROVIDER", "gpt")])).unwrap_err();
        assert!(format!("{err:#}").contains("AI_PROVIDER"), "{err:#}");
        let err = Settings::load_from(&vars(&[("AI_FALLBACK_PROVIDER", "x")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("AI_FALLBACK_PROVIDER"),
            "{err:#}"
        );
        let err = Settings::load_from(&vars(&[("ENABLE_AI_CACHE", "maybe")])).unwrap_err();
        assert!(format!("{err:#}").contains("ENABLE_AI_CACHE"), "{err:#}");
    }

    #[test]
    fn development_without_a_secret_warns() {
        let s = Settings::load_from(&vars(&[])).unwrap();
        assert!(s.warnings().iter().any(|w| w.contains("JWT_SECRET")));
        let s = Settings::load_from(&vars(&[("JWT_SECRET", "0123456789abcdef0123456789abcdef")]))
            .unwrap();
        assert!(s.warnings().is_empty());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::load_from(&vars(&[(
            "JWT_SECRET",
            "0123456789abcdef0123456789abcdef-top",
        )]))
        .unwrap();
        assert!(!format!("{s:?}").contains("top"));
    }

    #[test]
    fn durations_round_trip() {
        for text in ["250ms", "2s", "5m", "3h", "7d"] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
        }
        let day: HumanDuration = "24h".parse().unwrap();
        assert_eq!(day.to_string(), "1d");
        assert_eq!(day.to_string().parse::<HumanDuration>().unwrap(), day);
        assert_eq!(
            "3600".parse::<HumanDuration>().unwrap().get(),
            Duration::from_secs(3600)
        );
    }
}
