//! One client connection: the HTTP handshake, then the WebSocket session until it closes.
//!
//! The task reads into its core's shared read buffer and keeps bytes of its own only for a frame
//! that arrived in part, so an idle connection holds no read buffer. Writes go through the
//! connection's outbound queue, flushed by the core (see `core::Core::flush`).

use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use slog::{debug, trace, Logger};
use tungstenite::protocol::frame::coding::Control;

use crate::codes::close;
use crate::core::{CloseRequest, Conn, Core};
use crate::http::{self, Request};
use crate::session::{Reader, Step};
use crate::ws;

/// Time a client gets to send its handshake request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one connection handles before it lets the core's other tasks run.
const READS_PER_POLL: usize = 16;

/// Time the node waits for its close frame to be written and for the client's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one accepted TCP connection until it closes.
pub async fn serve(core: Rc<Core>, mut stream: TcpStream) {
    // The peer address appears only in debug and trace lines. Asking the kernel for it costs a
    // system call, so a node logging at info or above skips it. TCP_NODELAY needs no call at
    // all, because accepted sockets inherit it from the listener (`node::bind_listener`).
    let logs_connections = slog::Level::Debug.as_usize() <= core.config().log_level.as_usize();
    let remote = if logs_connections {
        stream.peer_addr().ok()
    } else {
        None
    };
    // Log lines name the connection with fields rather than a child logger, because a child
    // logger per connection would cost every idle connection a few hundred bytes.
    let log = &core.log;

    // The handshake and close futures are boxed: they are large, short-lived, and would
    // otherwise widen the task of every idle connection for its whole life.
    let handshake = Box::pin(glommio::timer::timeout(HANDSHAKE_TIMEOUT, async {
        Ok(handshake(&core, &mut stream).await)
    }));
    let (accept_key, leftover) = match handshake.await {
        Ok(Ok(Some(upgrade))) => upgrade,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            trace!(log, "handshake failed"; "remote_addr" => %Remote(remote), "error" => %error);
            return;
        }
        Err(_) => {
            let response = http::response(408, "text/plain", "handshake timed out\n", "");
            let _ = stream.write_all(&response).await;
            return;
        }
    };

    // The connection counts against max_connections before the upgrade is accepted.
    let Some(conn) = core.register(stream.as_raw_fd()) else {
        let body =
            "node is at max_connections or shutting down; retry later or connect to another node\n";
        let response = http::response(503, "text/plain", body, "Retry-After: 1\r\n");
        let _ = stream.write_all(&response).await;
        return;
    };
    if let Err(error) = stream.write_all(&http::upgrade_response(&accept_key)).await {
        trace!(log, "handshake failed"; "remote_addr" => %Remote(remote), "error" => %error);
        core.unregister(&conn);
        return;
    }
    debug!(log, "connection opened"; "conn_id" => conn.id, "remote_addr" => %Remote(remote));

    let mut session = Session {
        core: Rc::clone(&core),
        conn: Rc::clone(&conn),
        stream,
        reader: Reader::new(leftover),
        started: false,
    };
    let ending = poll_fn(|cx| session.poll_run(cx, log)).await;
    let (code, reason) = Box::pin(session.finish(ending, log)).await;
    core.unregister(&conn);
    debug!(log, "connection closed";
        "conn_id" => conn.id, "remote_addr" => %Remote(remote), "reason" => reason, "close_code" => code);
}

/// Reads the HTTP request and answers it unless it is an upgrade. Returns an upgrade's accept
/// key and the bytes after its head, or `None` when the request was answered with plain HTTP.
async fn handshake(core: &Core, stream: &mut TcpStream) -> io::Result<Option<(String, Vec<u8>)>> {
    // Both buffers live on the heap and are freed after the handshake, so that the connection's
    // long-lived task state stays small.
    let mut head = Vec::with_capacity(512);
    let mut chunk = vec![0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..read]);
        match http::parse(&head) {
            Request::Incomplete => continue,
            Request::Upgrade {
                accept_key,
                head_len,
            } => {
                // Frames sent right behind the handshake are kept; the buffer is not.
                let leftover = head[head_len..].to_vec();
                return Ok(Some((accept_key, leftover)));
            }
            Request::Health => {
                let body = crate::health::report(core);
                let response = http::response(200, "application/json", &body, "");
                stream.write_all(&response).await?;
                return Ok(None);
            }
            Request::Reject { status, reason } => {
                let body = format!("{reason}\n");
                stream
                    .write_all(&http::response(status, "text/plain", &body, ""))
                    .await?;
                return Ok(None);
            }
        }
    }
}

/// A peer address for logs, or `-` when the socket had none.
struct Remote(Option<std::net::SocketAddr>);

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The cause that ended a session.
enum Ending {
    /// The client closed the TCP connection.
    Eof,
    /// The socket failed.
    Io(io::Error),
    /// A close was requested, by the core or by a frame from the client.
    Close(CloseRequest),
    /// The client sent a close frame, which the node echoes.
    ClientClose(Option<u16>),
}

enum Event {
    Read(usize),
    Eof,
    Failed(io::Error),
    CloseRequested(CloseRequest),
}

struct Session {
    core: Rc<Core>,
    conn: Rc<Conn>,
    stream: TcpStream,
    reader: Reader,
    started: bool,
}

impl Session {
    /// Drives the session until it ends. Written as a poll function rather than an async fn so
    /// that the state every idle connection keeps is only the `Session` itself.
    fn poll_run(&mut self, cx: &mut Context<'_>, log: &Logger) -> Poll<Ending> {
        // Bytes that arrived with the handshake are frames already.
        if !self.reader.is_empty() && !self.started {
            if let Some(ending) = self.process(0, log) {
                return Poll::Ready(ending);
            }
        }
        self.started = true;
        for _ in 0..READS_PER_POLL {
            let event = match self.poll_event(cx) {
                Poll::Ready(event) => event,
                Poll::Pending => return Poll::Pending,
            };
            match event {
                Event::Read(len) => {
                    self.conn.touch();
                    if let Some(ending) = self.process(len, log) {
                        return Poll::Ready(ending);
                    }
                }
                Event::Eof => return Poll::Ready(Ending::Eof),
                Event::Failed(error) => return Poll::Ready(Ending::Io(error)),
                Event::CloseRequested(request) => return Poll::Ready(Ending::Close(request)),
            }
        }
        // A client that keeps the socket full must not starve the core's other tasks.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        self.conn.register_waker(cx.waker());
        if let Some(request) = self.conn.close_request() {
            return Poll::Ready(Event::CloseRequested(request));
        }
        if let Poll::Ready(Err(error)) = self.poll_blocked_write(cx) {
            return Poll::Ready(Event::Failed(error));
        }
        // During shutdown no request is read, so nothing is acknowledged that the node could
        // not deliver before it closes the connection.
        if self.core.intake_stopped() {
            return Poll::Pending;
        }
        let mut scratch = self.core.scratch.borrow_mut();
        match Pin::new(&mut self.stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) => Poll::Ready(Event::Eof),
            Poll::Ready(Ok(len)) => Poll::Ready(Event::Read(len)),
            Poll::Ready(Err(error)) => Poll::Ready(Event::Failed(error)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// While the socket's send buffer is full, waits for it to drain through glommio, then
    /// hands the rest of the queue back to the core's flush.
    fn poll_blocked_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.write_blocked.get() {
            let written = {
                let out = self.conn.out.borrow();
                let Some(head) = out.head() else {
                    self.conn.write_blocked.set(false);
                    break;
                };
                match Pin::new(&mut self.stream).poll_write(cx, head) {
                    Poll::Ready(Ok(written)) => written,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => return Poll::Pending,
                }
            };
            self.conn.out.borrow_mut().consume(written);
            self.conn.write_blocked.set(false);
            self.core.flush(&self.conn);
        }
        Poll::Ready(Ok(()))
    }

    /// Handles the `len` bytes just read into the core's read buffer.
    fn process(&mut self, len: usize, log: &Logger) -> Option<Ending> {
        let mut scratch = self.core.scratch.borrow_mut();
        let step = self
            .reader
            .feed(&mut scratch[..len], &self.core, &self.conn, log);
        drop(scratch);
        self.core.flush(&self.conn);
        match step {
            Step::Continue => None,
            Step::Close(error) => Some(Ending::Close(CloseRequest {
                code: Some(error.close_code()),
                reason: error.reason(),
            })),
            Step::ClientClose(code) => Some(Ending::ClientClose(code)),
        }
    }

    /// Sends the close frame the ending calls for and lets the client close first, within
    /// bounded time. Returns the close code and reason for the log.
    async fn finish(&mut self, ending: Ending, log: &Logger) -> (Option<u16>, &'static str) {
        let (code, reason, echo) = match ending {
            Ending::Eof => return (None, "client disconnected"),
            Ending::Io(error) => {
                debug!(log, "socket failed"; "conn_id" => self.conn.id, "error" => %error);
                return (None, "socket error");
            }
            Ending::Close(CloseRequest { code: None, reason }) => return (None, reason),
            Ending::Close(CloseRequest {
                code: Some(code),
                reason,
            }) => (code, reason, false),
            Ending::ClientClose(code) => (code.unwrap_or(close::NORMAL), "client closed", true),
        };

        // Messages published before the close still go out ahead of the close frame, among
        // them the connection's own. No frame may follow the close frame: marking the
        // connection closing stops deliveries and pings from being queued behind it.
        self.core.deliver_undelivered();
        self.conn.request_close(CloseRequest {
            code: Some(code),
            reason,
        });
        if code == close::SLOW_CONSUMER {
            self.conn.out.borrow_mut().discard_unsent();
        }
        let frame = if echo {
            ws::encode_control(Control::Close, &code.to_be_bytes())
        } else {
            ws::encode_close(code, reason)
        };
        self.core.enqueue_control(&self.conn, Rc::from(frame));
        self.core.flush(&self.conn);

        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let _ = glommio::timer::timeout(CLOSE_TIMEOUT, async {
            self.drain_queue().await;
            if !echo {
                // RFC 6455 7.1.1: the server closes TCP after the close handshake; give the
                // client a moment to answer, reading and discarding what it still sends.
                let _ = self.stream.shutdown(std::net::Shutdown::Write).await;
                let mut sink = vec![0u8; 512];
                while Instant::now() < deadline {
                    match self.stream.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            Ok(())
        })
        .await;
        (Some(code), reason)
    }

    /// Writes the rest of the outbound queue, waiting on the socket as needed.
    async fn drain_queue(&mut self) {
        // The core's flush must leave the queue alone while this task writes it.
        self.conn.write_blocked.set(true);
        loop {
            let Some(head) = self.conn.out.borrow().head().map(<[u8]>::to_vec) else {
                return;
            };
            match poll_fn(|cx| Pin::new(&mut self.stream).poll_write(cx, &head)).await {
                Ok(written) => self.conn.out.borrow_mut().consume(written),
                Err(_) => return,
            }
        }
    }
}
