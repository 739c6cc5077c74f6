//! `switchboard-plain-hub`: the minimal broadcast server the benchmarks compare switchboard
//! with, as close to the floor as a useful chat server gets: tokio-tungstenite, one task per
//! connection, small buffers, a bounded queue per connection (a client that falls behind is
//! dropped), and each broadcast serialised once. It stores nothing, checks nothing and has
//! no notion of users. Protocol (JSON text frames):
//!
//! - `{"type":"join","room":"r"}` → `{"type":"joined","room":"r"}`
//! - `{"type":"send","room":"r","content":"…"}` → every member of `r` (the sender too, if a
//!   member) gets `{"type":"message","room":"r","content":"…"}`
//!
//! Usage: `switchboard-plain-hub [ADDR]` (default 127.0.0.1:9001); prints `listening on ADDR`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Frames queued for one connection before it counts as too slow and is dropped.
const QUEUE: usize = 256;
/// Queued frames written before one flush.
const WRITE_BATCH: usize = 64;

struct Member {
    tx: mpsc::Sender<Message>,
    kill: Arc<Notify>,
}

type Rooms = Arc<Mutex<HashMap<String, HashMap<u64, Member>>>>;

#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    room: String,
    #[serde(default)]
    content: String,
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let rooms: Rooms = Arc::default();
    let ids = Arc::new(AtomicU64::new(1));
    loop {
        let (socket, _) = listener.accept().await?;
        let (rooms, id) = (rooms.clone(), ids.fetch_add(1, Ordering::Relaxed));
        tokio::spawn(async move {
            let joined = connection(socket, id, &rooms).await;
            let mut rooms = rooms.lock().unwrap_or_else(|p| p.into_inner());
            for room in joined {
                if let Some(members) = rooms.get_mut(&room) {
                    members.remove(&id);
                    if members.is_empty() {
                        rooms.remove(&room);
                    }
                }
            }
        });
    }
}

/// Serves one connection until it closes or is dropped; returns the rooms it joined.
async fn connection(socket: TcpStream, id: u64, rooms: &Rooms) -> Vec<String> {
    let mut joined = Vec::new();
    let _ = socket.set_nodelay(true);
    let config = WebSocketConfig {
        write_buffer_size: 0,
        max_message_size: Some(64 << 10),
        max_frame_size: Some(64 << 10),
        ..WebSocketConfig::default()
    };
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(socket, Some(config)).await else {
        return joined;
    };
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    let kill = Arc::new(Notify::new());
    loop {
        tokio::select! {
            _ = kill.notified() => break,
            out = rx.recv() => {
                let Some(first) = out else { break };
                if ws.feed(first).await.is_err() {
                    break;
                }
                let mut more = 0;
                while more < WRITE_BATCH {
                    let Ok(next) = rx.try_recv() else { break };
                    if ws.feed(next).await.is_err() {
                        return joined;
                    }
                    more += 1;
                }
                if ws.flush().await.is_err() {
                    break;
                }
            }
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                let Ok(msg) = serde_json::from_str::<Incoming>(&text) else { continue };
                match msg.kind.as_str() {
                    "join" => {
                        rooms
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(msg.room.clone())
                            .or_default()
                            .insert(id, Member { tx: tx.clone(), kill: kill.clone() });
                        let reply = format!(r#"{{"type":"joined","room":{}}}"#, quoted(&msg.room));
                        joined.push(msg.room);
                        if tx.try_send(Message::text(reply)).is_err() {
                            break;
                        }
                    }
                    "send" => broadcast(rooms, &msg.room, &msg.content),
                    _ => {}
                }
            }
        }
    }
    joined
}

/// Serialises the frame once and queues it for every member; a full queue drops that member.
fn broadcast(rooms: &Rooms, room: &str, content: &str) {
    let frame = format!(
        r#"{{"type":"message","room":{},"content":{}}}"#,
        quoted(room),
        quoted(content)
    );
    let mut rooms = rooms.lock().unwrap_or_else(|p| p.into_inner());
    let Some(members) = rooms.get_mut(room) else {
        return;
    };
    members.retain(|_, m| match m.tx.try_send(Message::text(frame.clone())) {
        Ok(()) => true,
        Err(_) => {
            m.kill.notify_one();
            false
        }
    });
}

/// `text` as a JSON string. Frames are written by hand so that `type` comes first, as in
/// switchboard's frames (serde_json's maps would sort the keys).
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}
