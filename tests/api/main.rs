mod desk;
mod helpers;
mod realtime;
mod search;
mod ws;
