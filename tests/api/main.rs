mod ai_http;
mod ai_turns;
mod fake_http;
mod helpers;
mod providers;
mod realtime;
mod resilience;
mod ws;
