//! The WebSocket on the raw TCP socket, after the HTTP upgrade has handed the socket over.
//!
//! Two halves: [`FrameReader`] is a stream of whole messages that the WsSession actor polls
//! (so while the actor waits, the socket is not read), and [`write_loop`] drains the
//! connection's bounded outbound queue into the socket, many queued frames to one write. The
//! loop runs as the socket's own task, started once the upgrade's answer is written
//! (`crate::server`).
//!
//! The reader also waits while the outbound queue is low on room ([`Room`]): a client that
//! sends faster than it reads what comes back is slowed down by TCP, and the queue keeps room
//! for what the client's own sends still have coming (their acks and echoes). What can still
//! fill it is what comes unasked (other members' messages, an answer's tokens, presence) to a
//! client that does not read it: that one is dropped as a slow consumer.
//!
//! Nothing is buffered while a connection is idle: bytes are read into a buffer on the stack and
//! kept only while a frame is incomplete, and the write buffer lives for one write. An idle
//! socket costs the actor, its queue and the task, not two HTTP buffers of 8 KiB.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, Message, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{mpsc, oneshot, Notify};

use super::Kick;
use crate::actors::session_manager::messages::Out;
use crate::protocol::ServerFrame;

/// How long the writer keeps trying to say goodbye to a client that is not reading.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Bytes read from the socket at a time, on the stack (not zeroed first).
const READ_CHUNK: usize = 4096;
/// Queued frames are gathered into one write up to about this many bytes.
const WRITE_BATCH_BYTES: usize = 16 * 1024;

/// A whole message from the client: continuation frames are joined, text is checked UTF-8.
#[derive(Debug)]
pub enum Inbound {
    Text(ByteString),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    Close(Option<CloseReason>),
}

/// A message arriving in continuation frames.
struct Partial {
    text: bool,
    bytes: BytesMut,
}

/// Room left in a connection's outbound queue, as the reader sees it: it takes no message
/// from the client while fewer than `headroom` slots are free, and the writer says when it
/// has made room.
pub struct Room {
    outbox: mpsc::Sender<Out>,
    headroom: usize,
    made: Arc<Notify>,
    waiting: Option<Pin<Box<OwnedNotified>>>,
}

impl Room {
    /// Keeps `headroom` slots of `outbox` free for what is already on its way (at most the
    /// queue's size); the writer calls [`Notify::notify_one`] on `made` after each write.
    pub fn new(outbox: mpsc::Sender<Out>, headroom: usize, made: Arc<Notify>) -> Room {
        Room {
            headroom: headroom.clamp(1, outbox.max_capacity()),
            outbox,
            made,
            waiting: None,
        }
    }

    /// Ready once the queue has room (or is closed: then nothing waits for it).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.outbox.capacity() >= self.headroom || self.outbox.is_closed() {
                self.waiting = None;
                return Poll::Ready(());
            }
            // `notify_one` keeps a wake-up for a waiter that comes later, so one the writer
            // sent between the check above and this is not lost: the loop checks again.
            let made = self.made.clone();
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(made.notified_owned()));
            ready!(waiting.as_mut().poll(cx));
            self.waiting = None;
        }
    }
}

/// Reads whole messages off the socket. Frames and joined messages over `max_bytes` are a
/// [`ProtocolError::Overflow`]; after any error the stream ends.
pub struct FrameReader {
    io: OwnedReadHalf,
    /// Waited for before each message is handed on.
    room: Room,
    /// Bytes read and not yet decoded: empty (and unallocated) between frames.
    buf: BytesMut,
    codec: Codec,
    max_bytes: usize,
    partial: Option<Partial>,
    ended: bool,
}

impl FrameReader {
    /// `read` holds what the client sent after its upgrade request, if anything.
    pub fn new(io: OwnedReadHalf, read: BytesMut, max_bytes: usize, room: Room) -> FrameReader {
        FrameReader {
            io,
            room,
            buf: read,
            codec: Codec::new().max_size(max_bytes),
            max_bytes,
            partial: None,
            ended: false,
        }
    }

    /// The next whole message among the bytes already read, if they hold one.
    fn decode(&mut self) -> Result<Option<Inbound>, ProtocolError> {
        while let Some(frame) = self.codec.decode(&mut self.buf)? {
            let message = match frame {
                Frame::Text(bytes) => Inbound::Text(utf8(bytes)?),
                Frame::Binary(bytes) => Inbound::Binary(bytes),
                Frame::Ping(bytes) => Inbound::Ping(bytes),
                Frame::Pong(bytes) => Inbound::Pong(bytes),
                Frame::Close(reason) => Inbound::Close(reason),
                Frame::Continuation(item) => match self.join(item)? {
                    Some(message) => message,
                    None => continue,
                },
            };
            return Ok(Some(message));
        }
        Ok(None)
    }

    /// Adds a continuation frame; returns the message once its last frame is in. The codec
    /// checks that first, middle and last frames come in order.
    fn join(&mut self, item: Item) -> Result<Option<Inbound>, ProtocolError> {
        // (begins a message as text or binary, the piece, ends it)
        let (begins, bytes, last) = match item {
            Item::FirstText(bytes) => (Some(true), bytes, false),
            Item::FirstBinary(bytes) => (Some(false), bytes, false),
            Item::Continue(bytes) => (None, bytes, false),
            Item::Last(bytes) => (None, bytes, true),
        };
        if let Some(text) = begins {
            self.partial = Some(Partial {
                text,
                bytes: BytesMut::new(),
            });
        }
        let Some(partial) = self.partial.as_mut() else {
            return Err(ProtocolError::ContinuationNotStarted);
        };
        if partial.bytes.len() + bytes.len() > self.max_bytes {
            return Err(ProtocolError::Overflow);
        }
        partial.bytes.extend_from_slice(&bytes);
        if !last {
            return Ok(None);
        }
        let text = partial.text;
        let bytes = std::mem::take(&mut partial.bytes).freeze();
        self.partial = None;
        Ok(Some(if text {
            Inbound::Text(utf8(bytes)?)
        } else {
            Inbound::Binary(bytes)
        }))
    }
}

impl Stream for FrameReader {
    type Item = Result<Inbound, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            ready!(this.room.poll_room(cx));
            match this.decode() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            // Not zeroed: the socket fills the front of it, and only that part (`filled`) is read.
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk);
            let polled = Pin::new(&mut this.io).poll_read(cx, &mut read);
            if polled.is_pending() && this.buf.is_empty() {
                // Between frames: give the buffer back rather than keep it for an idle client.
                this.buf = BytesMut::new();
            }
            match ready!(polled) {
                Ok(()) if read.filled().is_empty() => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Ok(()) => this.buf.extend_from_slice(read.filled()),
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(e))));
                }
            }
        }
    }
}

/// Drains the outbound queue into the socket until the queue closes or `killed` fires. When
/// `killed` fires it stops at once, past whatever is queued, says why in an `error` frame and a
/// close frame (giving up after a grace period if the client is not reading), and ends.
/// `made_room` is told after each write, and at the end: a reader waiting for room then sees
/// the queue closed.
pub async fn write_loop(
    socket: OwnedWriteHalf,
    rx: mpsc::Receiver<Out>,
    killed: oneshot::Receiver<Kick>,
    made_room: Arc<Notify>,
) {
    write_until_the_end(socket, rx, killed, &made_room).await;
    made_room.notify_one();
}

async fn write_until_the_end(
    mut socket: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    mut killed: oneshot::Receiver<Kick>,
    made_room: &Notify,
) {
    let mut codec = Codec::new();
    loop {
        let mut next = tokio::select! {
            biased;
            kick = &mut killed => return goodbye(socket, &mut codec, kick.ok()).await,
            out = rx.recv() => out,
        };
        let mut buf = BytesMut::new();
        let mut closing = None;
        // Everything already queued goes out in one write.
        loop {
            match next {
                None => {
                    closing = Some(None);
                    break;
                }
                Some(Out::Close(kick)) => {
                    closing = Some(Some(kick));
                    break;
                }
                Some(out) => encode(&mut codec, out, &mut buf),
            }
            if buf.len() >= WRITE_BATCH_BYTES {
                break;
            }
            match rx.try_recv() {
                Ok(out) => next = Some(out),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => next = None,
            }
        }
        if !buf.is_empty() {
            let written = tokio::select! {
                biased;
                kick = &mut killed => return goodbye(socket, &mut codec, kick.ok()).await,
                written = socket.write_all(&buf) => written,
            };
            if written.is_err() {
                return; // the client is gone; the actor sees its read half end
            }
            made_room.notify_one();
        }
        if let Some(kick) = closing {
            return goodbye(socket, &mut codec, kick).await;
        }
    }
}

fn encode(codec: &mut Codec, out: Out, buf: &mut BytesMut) {
    let message = match out {
        Out::Frame(text) => Message::Text(text),
        Out::Batch(texts) => {
            for text in texts {
                encode(codec, Out::Frame(text), buf);
            }
            return;
        }
        Out::Ping => Message::Ping(Bytes::new()),
        Out::Pong(bytes) => Message::Pong(bytes),
        // The loop turns a close into a goodbye.
        Out::Close(_) => return,
    };
    // Encoding a server frame into memory cannot fail: no size limit applies when writing.
    if let Err(e) = codec.encode(message, buf) {
        log::error!("encoding a WebSocket frame failed: {e}");
    }
}

/// Sends the reason (an `error` frame, when there is one) and a close frame, then ends the
/// connection. Bounded by [`CLOSE_GRACE`]: a client that is not reading is not waited for.
async fn goodbye(mut socket: OwnedWriteHalf, codec: &mut Codec, kick: Option<Kick>) {
    let mut buf = BytesMut::new();
    let reason = match &kick {
        Some(kick) => {
            let frame = ServerFrame::error(kick.code, kick.message.clone()).to_text();
            encode(codec, Out::Frame(ByteString::from(frame)), &mut buf);
            let code = match kick.code {
                "frame_too_large" => CloseCode::Size,
                "protocol_error" => CloseCode::Protocol,
                "invalid_utf8" => CloseCode::Invalid,
                "shutdown" => CloseCode::Restart,
                _ => CloseCode::Policy,
            };
            Some(CloseReason {
                code,
                description: Some(kick.code.to_string()),
            })
        }
        None => Some(CloseReason::from(CloseCode::Normal)),
    };
    if let Err(e) = codec.encode(Message::Close(reason), &mut buf) {
        log::error!("encoding a close frame failed: {e}");
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        socket.write_all(&buf).await?;
        socket.shutdown().await
    })
    .await;
}

fn utf8(bytes: Bytes) -> Result<ByteString, ProtocolError> {
    ByteString::try_from(bytes)
        .map_err(|e| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))
}
