mod browser;
mod helpers;
mod pages;
mod realtime;
mod webdriver;
mod ws;
