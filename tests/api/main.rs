mod helpers;
mod ratelimit;
mod realtime;
mod shutdown;
mod ws;
