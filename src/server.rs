//! The HTTP server: actix-web's `App` answers every request, and a WebSocket it accepts is
//! handed the raw socket.
//!
//! actix-web's own server keeps a connection's HTTP dispatcher, with an 8 KiB read buffer and
//! an 8 KiB write buffer, for the life of an upgraded WebSocket: more than everything else a
//! connection holds. Here an upgrade request goes to [`upgrade`] instead. It runs the same
//! `App` (routing, middleware, the token check); when the answer is `101` with an
//! [`Accepted`] attached, it writes the answer and hands the socket to a task of its own,
//! dropping the HTTP buffers and ending the HTTP connection's task; any other answer (401,
//! 403, 400, …) is written and the connection closed.

use std::net::TcpListener;
use std::rc::Rc;
use std::time::Duration;

use actix_codec::{Framed, FramedParts};
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::h1::{self, Message};
use actix_http::{ConnectionType, HttpService, KeepAlive, Request, Response, StatusCode};
use actix_service::{fn_factory, fn_service, map_config, IntoServiceFactory, Service};
use actix_service::{ServiceFactory, ServiceFactoryExt};
use actix_web::dev::{AppConfig, Server, ServiceResponse};
use futures_util::SinkExt;
use tokio::net::TcpStream;

use crate::actors::ws_session::Accepted;

/// How long a client has to send its request head, as actix-web's default.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing HTTP connection may take to say goodbye, as actix-web's default.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest body of a refused upgrade that is written back (they are short JSON errors).
const REFUSAL_BODY_MAX: usize = 64 * 1024;

/// Serves `factory`'s `App` on `listener` with `workers` threads. Signals are left to the
/// caller; `shutdown_timeout` bounds a graceful stop.
pub fn serve<F, I, S, B>(
    listener: TcpListener,
    workers: usize,
    shutdown_timeout: Duration,
    factory: F,
) -> std::io::Result<Server>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<
            Request,
            Config = AppConfig,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    let addr = listener.local_addr()?;
    let builder = Server::build();
    let closing = builder.graceful_shutdown_signal();
    Ok(builder
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(shutdown_timeout.as_secs().max(1))
        .listen("switchboard-http", listener, move || {
            let config = move |()| AppConfig::__priv_test_new(false, addr.to_string(), addr);
            let closing = closing.clone();
            let for_upgrades = factory.clone();
            let upgrades = fn_factory(move || {
                let app = for_upgrades().into_factory();
                async move {
                    let app = Rc::new(app.new_service(config(())).await?);
                    Ok::<_, ()>(fn_service(move |(req, framed)| {
                        upgrade(app.clone(), req, framed)
                    }))
                }
            });
            let requests = factory()
                .into_factory()
                .map_err(|e: actix_web::Error| e.error_response());
            HttpService::build()
                .graceful_shutdown_signal(move || {
                    let closing = closing.clone();
                    async move { closing.notified().await }
                })
                .keep_alive(KeepAlive::default())
                .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
                .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
                .local_addr(addr)
                .upgrade(upgrades)
                .finish(map_config(requests, config))
                .tcp()
        })?
        .run())
}

/// Answers a request that asked for an upgrade: through the `App`, then either hands the socket
/// to the accepted WebSocket or writes the refusal and closes.
async fn upgrade<S, B>(
    app: Rc<S>,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_web::Error>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    // Boxed: the App's future is large and needed only until the answer, while this one
    // lives as long as the connection.
    let mut res: Response<BoxBody> = match Box::pin(app.call(req)).await {
        Ok(res) => Response::from(res).map_into_boxed_body(),
        Err(e) => e.error_response().into(),
    };
    let accepted = (res.status() == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| res.extensions_mut().remove::<Accepted>())
        .flatten();
    if let Some(accepted) = accepted {
        framed
            .send(Message::Item((res.drop_body(), BodySize::None)))
            .await?;
        // The HTTP write buffer goes now, not when the connection ends; and the socket runs
        // as a task of its own, so that this connection's task, its HTTP dispatcher and the
        // request it kept end here too (2.3 KiB a socket). Shutdown waits for the socket
        // through `Accepted::open`.
        let FramedParts { io, read_buf, .. } = framed.into_parts();
        actix_rt::spawn(accepted.run(io, read_buf));
        return Ok(());
    }
    let (mut head, body) = res.into_parts();
    head.head_mut().set_connection_type(ConnectionType::Close);
    let size = body.size();
    framed.send(Message::Item((head, size))).await?;
    if !matches!(size, BodySize::None) {
        let bytes = actix_http::body::to_bytes_limited(body, REFUSAL_BODY_MAX)
            .await
            .map_err(|_| actix_web::error::ErrorInternalServerError("refusal too long"))?
            .map_err(|e| actix_web::error::ErrorInternalServerError(e.to_string()))?;
        if !bytes.is_empty() {
            framed.send(Message::Chunk(Some(bytes))).await?;
        }
        framed.send(Message::Chunk(None)).await?;
    }
    Ok(())
}
