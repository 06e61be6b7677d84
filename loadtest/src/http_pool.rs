//! Publishing through the Pusher HTTP API over a small pool of connections.
//!
//! Sockudo 5.2.0 sends `Connection: close` with every HTTP API response and
//! drops requests pipelined behind the first, so one connection carries one
//! request. A publisher's pool has [`SLOTS`] slots, each with one
//! connection. A slot opens its connection before it takes a message, so
//! connecting stays off the measured latency. It writes one request, waits
//! for the response, and opens a new connection when the server closes the
//! old one.
//! A server that keeps the connection open gets the next request on it.
//!
//! The publisher counts a message as published when it hands it to an idle
//! slot ([`HttpPool::dispatch`]), before the slot runs. The slot stamps the
//! message when it writes the request, so latency counts from that write.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, timeout_at};

use crate::payload::Stamp;
use crate::procfs::now_ns;
use crate::publisher::io_kind;
use crate::pusher::{parse_response, App, RequestWriter, Response};
use crate::shard::Shard;
use crate::ws::{connect_tcp, WsUrl};

/// Connections, and so requests in progress, per publisher.
pub const SLOTS: usize = 16;

/// Wait before a slot tries again after a failed connection attempt.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Longest wait for a response when the run has no timeline yet.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Maximum size of one response, head and body.
const MAX_RESPONSE: usize = 1 << 20;

/// A message handed to a slot: its sequence number and the position of its
/// topic in the publisher's cycle.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub seq: u64,
    pub topic: usize,
}

/// Destination and content of one publisher's requests.
pub struct Target {
    pub addr: SocketAddr,
    pub bind: Option<IpAddr>,
    pub publisher: u32,
    /// Length of each event's `data` value.
    pub size: usize,
    /// Topic names by position in the publisher's cycle.
    pub topics: Vec<String>,
}

struct Slot {
    job: Cell<Option<Job>>,
    wake: Notify,
}

/// State that the publisher and its slot tasks share.
struct PoolState {
    slots: Vec<Slot>,
    /// Slots that have an open connection and wait for a message.
    idle: RefCell<Vec<usize>>,
    /// Wakes the publisher when a slot becomes idle.
    idle_added: Notify,
    stopping: Cell<bool>,
}

impl PoolState {
    fn stop(&self) {
        self.stopping.set(true);
        for slot in &self.slots {
            slot.wake.notify_one();
        }
    }
}

/// The connections of one publisher.
pub struct HttpPool {
    state: Rc<PoolState>,
    tasks: Vec<JoinHandle<()>>,
}

impl HttpPool {
    /// Opens [`SLOTS`] connections to the host and port of `url` and starts
    /// one task per slot. Fails when a connection cannot be opened.
    pub async fn connect(
        shard: &Rc<Shard>,
        url: &WsUrl,
        app: &App,
        target: Target,
    ) -> io::Result<HttpPool> {
        let mut streams = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            streams.push(connect_tcp(target.addr, target.bind).await?);
        }
        let state = Rc::new(PoolState {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    job: Cell::new(None),
                    wake: Notify::new(),
                })
                .collect(),
            idle: RefCell::new(Vec::with_capacity(SLOTS)),
            idle_added: Notify::new(),
            stopping: Cell::new(false),
        });
        let target = Rc::new(target);
        let writer = RequestWriter::new(url, app);
        let tasks = streams
            .into_iter()
            .enumerate()
            .map(|(index, stream)| {
                let task = SlotTask {
                    shard: shard.clone(),
                    state: state.clone(),
                    target: target.clone(),
                    index,
                    writer: writer.clone(),
                    stream: Some(stream),
                    request: Vec::new(),
                    response: Vec::new(),
                };
                tokio::task::spawn_local(task.run())
            })
            .collect();
        Ok(HttpPool { state, tasks })
    }

    /// Returns the number of idle slots: messages that can be sent now.
    pub fn room(&self) -> u64 {
        self.state.idle.borrow().len() as u64
    }

    /// Hands `job` to an idle slot, which writes it when the publisher next
    /// waits. Returns false, and sends nothing, when no slot is idle.
    pub fn dispatch(&self, job: Job) -> bool {
        let Some(index) = self.state.idle.borrow_mut().pop() else {
            return false;
        };
        let slot = &self.state.slots[index];
        slot.job.set(Some(job));
        slot.wake.notify_one();
        true
    }

    /// Waits until a slot becomes idle.
    pub async fn room_added(&self) {
        self.state.idle_added.notified().await;
    }

    /// Stops the slots: idle ones at once, busy ones when their response
    /// arrives or at `end`, whichever comes first.
    pub async fn finish(&mut self, end: Instant) {
        self.state.stop();
        for task in &mut self.tasks {
            if timeout_at(end.into(), &mut *task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for HttpPool {
    fn drop(&mut self) {
        self.state.stop();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One slot's task and its connection.
struct SlotTask {
    shard: Rc<Shard>,
    state: Rc<PoolState>,
    target: Rc<Target>,
    index: usize,
    writer: RequestWriter,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl SlotTask {
    async fn run(mut self) {
        loop {
            if !self.reconnect_if_closed().await {
                return;
            }
            self.state.idle.borrow_mut().push(self.index);
            self.state.idle_added.notify_one();
            let Some(job) = self.next_job().await else {
                return;
            };
            self.publish(job).await;
        }
    }

    /// Waits for the next message, or returns `None` when the pool stops.
    async fn next_job(&self) -> Option<Job> {
        let slot = &self.state.slots[self.index];
        loop {
            if let Some(job) = slot.job.take() {
                return Some(job);
            }
            if self.state.stopping.get() {
                return None;
            }
            slot.wake.notified().await;
        }
    }

    /// Opens a new connection unless the current one is still open, trying
    /// again every [`RECONNECT_DELAY`]. Returns false when the pool stops
    /// first.
    async fn reconnect_if_closed(&mut self) -> bool {
        if self.stream.as_ref().is_some_and(is_open) {
            return true;
        }
        self.stream = None;
        while !self.state.stopping.get() {
            match self.open().await {
                Ok(stream) => {
                    self.stream = Some(stream);
                    return true;
                }
                Err(error) => {
                    let code = format!("publisher:connect_{}", io_kind(&error));
                    self.shard.report.borrow_mut().count_error(&code);
                    sleep(RECONNECT_DELAY).await;
                }
            }
        }
        false
    }

    async fn open(&self) -> io::Result<TcpStream> {
        let connecting = connect_tcp(self.target.addr, self.target.bind);
        match timeout(self.shard.config.connect_timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Sends one message and counts a failed request or a status other
    /// than 200 as a publish error.
    async fn publish(&mut self, job: Job) {
        let failure = match self.exchange(job).await {
            Ok(response) => {
                if response.closes {
                    self.stream = None;
                }
                (response.status != 200).then(|| format!("publish:http_{}", response.status))
            }
            Err(error) => {
                self.stream = None;
                Some(format!("publish:{}", io_kind(&error)))
            }
        };
        if let Some(code) = failure {
            let mut report = self.shard.report.borrow_mut();
            report.counts.publish_errors += 1;
            report.count_error(&code);
        }
    }

    /// Writes the request of `job` and reads its response. The connection
    /// may have closed while the slot was idle: it then opens a new one
    /// first, and that connect time counts in this message's latency.
    async fn exchange(&mut self, job: Job) -> io::Result<Response> {
        let stream = match self.stream.take().filter(is_open) {
            Some(stream) => stream,
            None => self.open().await?,
        };
        let stream = self.stream.insert(stream);
        let stamp = Stamp {
            sent_ns: now_ns(),
            seq: job.seq,
            publisher: self.target.publisher,
        };
        self.request.clear();
        let topic = &self.target.topics[job.topic];
        self.writer
            .write_request(&mut self.request, topic, &stamp, self.target.size);
        stream.write_all(&self.request).await?;

        let end = self.shard.timeline().map_or_else(
            || Instant::now() + RESPONSE_TIMEOUT,
            |timeline| timeline.end,
        );
        self.response.clear();
        read_response(stream, &mut self.response, end).await
    }
}

/// Returns whether the server has neither closed `stream` nor sent
/// anything on it, which it must not do before a request.
fn is_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
}

/// Reads one response into `buffer`, waiting at most until `end`. Bytes
/// after the response mark the connection as closing, since no other
/// response is due on it.
async fn read_response(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    end: Instant,
) -> io::Result<Response> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(mut response) = parse_response(buffer)? {
            response.closes |= buffer.len() > response.len;
            return Ok(response);
        }
        if buffer.len() > MAX_RESPONSE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP response longer than 1 MiB",
            ));
        }
        let count = match timeout_at(end.into(), stream.read(&mut chunk)).await {
            Ok(result) => result?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        };
        if count == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..count]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn response_split_over_reads_completes() {
        let (mut client, mut server) = pair().await;
        let end = Instant::now() + Duration::from_secs(5);
        let writer = tokio::spawn(async move {
            server.write_all(b"HTTP/1.1 200 OK\r\nconn").await.unwrap();
            sleep(Duration::from_millis(20)).await;
            server
                .write_all(b"ection: close\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
            server
        });
        let mut buffer = Vec::new();
        let response = read_response(&mut client, &mut buffer, end)
            .await
            .expect("response");
        assert_eq!(response.status, 200);
        assert!(response.closes);
        drop(writer.await);
    }

    #[tokio::test]
    async fn close_before_response_is_eof() {
        let (mut client, server) = pair().await;
        drop(server);
        let end = Instant::now() + Duration::from_secs(5);
        let error = read_response(&mut client, &mut Vec::new(), end)
            .await
            .expect_err("no response");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn closed_connection_is_not_open() {
        let (client, server) = pair().await;
        assert!(is_open(&client));
        drop(server);
        client.readable().await.expect("readable");
        assert!(!is_open(&client));
    }
}
