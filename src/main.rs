//! The `switchboard` command line: `serve` (the default), `migrate`, `check-db`, `user`.

use clap::{Parser, Subcommand};
use switchboard::cli;
use switchboard::db::models::Role;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Realtime chat hub with an AI consultant and human takeover"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Connect, run `SELECT 1`, print backend, pool and migration state; exit 0 or 1.
    CheckDb,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; the password is read from the first line of standard input.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// Change a user's role or lock them out (`--active false`).
    Set {
        #[arg(long)]
        email: String,
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        #[arg(long)]
        active: Option<bool>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("`{s}` is not a role; use customer, agent or admin"))
}

fn main() {
    // Operators type `-check-db` (single dash); accept it and `--check-db` as the sub-command.
    let args = std::env::args().map(|a| match a.as_str() {
        "-check-db" | "--check-db" => "check-db".to_string(),
        _ => a,
    });
    let parsed = Cli::parse_from(args);
    let code = actix_rt::System::new().block_on(async move {
        match parsed.command.unwrap_or(Command::Serve) {
            Command::Serve => cli::serve().await,
            Command::Migrate => cli::migrate().await,
            Command::CheckDb => cli::check_db().await,
            Command::User(UserCommand::Create { email, role }) => {
                cli::create_user(email, role).await
            }
            Command::User(UserCommand::Set {
                email,
                role,
                active,
            }) => cli::set_user(email, role, active).await,
        }
    });
    exit_now(code);
}

/// Ends the process without running C `atexit` handlers.
///
/// `std::process::exit` runs them, and with PostgreSQL linked in, libpq's and OpenSSL's
/// handlers tear down state that threads still holding pool connections go on to use: the
/// process then dies with SIGSEGV after its work is done (seen as exit code 139 after about
/// one `check-db` or `migrate` in ten). Everything worth keeping is written by now; flushing
/// stdout and stderr is all that is left to do.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` only ends the process; the buffers Rust keeps were flushed above.
    unsafe { libc::_exit(code) }
}
