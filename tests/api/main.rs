mod bench_smoke;
mod helpers;
mod realtime;
mod ws;
