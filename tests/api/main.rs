mod helpers;
mod realtime;
mod shutdown;
mod ws;
