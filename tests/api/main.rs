mod auth;
mod bad_input;
mod cli;
mod health;
mod helpers;
mod realtime;
mod sessions;
mod ws;
