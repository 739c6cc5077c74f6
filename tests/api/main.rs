mod helpers;
mod realtime;
mod ws;
