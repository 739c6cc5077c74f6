mod helpers;
mod memory;
mod ratelimit;
mod realtime;
mod shutdown;
mod ws;
