//! nexus-yardstick: a measuring stick for the load tests, NOT a broker.
//!
//! It has no robustness: no limits on buffers or message size beyond a
//! 16 MiB frame cap, no heartbeat, no validation, no wildcards, no
//! fragmented messages. Use it only on 127.0.0.1 to measure how fast a
//! WebSocket pub/sub server on this machine can go.
//!
//! It is one thread on raw Linux epoll with nonblocking sockets. Each loop
//! iteration waits for events, reads once from every readable socket and
//! handles every complete frame. Reads are level-triggered, so bytes left
//! unread come back in the next iteration. Only after all reads does it
//! write, and every socket with pending output gets exactly one `send()`.
//! A PUBLISH builds its delivery frame (WebSocket header plus
//! `{"type":"message","topic":T,"data":D}`) once and appends those bytes to
//! each subscriber's output buffer. Requests are not parsed as JSON: the
//! fields are found with memmem and the `data` value is copied raw.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::{env, mem, process, ptr};

use base64::Engine as _;
use memchr::memmem;

const DEFAULT_LISTEN: &str = "127.0.0.1:3101";
/// Accept queue length, so that connection storms are not throttled by SYN drops.
const LISTEN_BACKLOG: i32 = 4096;
const MAX_EVENTS: usize = 1024;
/// Bytes requested by one `recv()`.
const READ_SIZE: usize = 64 * 1024;
/// Output capacity a connection keeps after its backlog is flushed.
const OUTPUT_KEEP: usize = 64 * 1024;
/// Largest frame payload accepted; a larger frame closes the connection.
const MAX_PAYLOAD: u64 = 16 << 20;
/// Largest HTTP upgrade request accepted.
const MAX_HANDSHAKE: usize = 8 * 1024;
/// Key suffix from RFC 6455 section 1.3, hashed to form Sec-WebSocket-Accept.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const LISTENER_TOKEN: u64 = u64::MAX;

const UNHANDLED_REQUEST: &[u8] =
    b"the yardstick handles only SUBSCRIBE, UNSUBSCRIBE, PUBLISH and PING with their fields";

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;

/// One client connection, stored in `Connections::slots` at the index of its fd.
struct Connection {
    socket: OwnedFd,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes at the front of `output` that were already sent.
    sent: usize,
    upgraded: bool,
    /// Topics this connection subscribed to, so that closing it can remove it.
    topics: Vec<Box<[u8]>>,
    /// Whether the fd is in `Connections::dirty`.
    dirty: bool,
    /// Whether EPOLLOUT is registered, which is only while a send was partial.
    writable_armed: bool,
    /// Close once the output is flushed (after a close frame or a 400).
    closing: bool,
    /// Whether the fd is in `Server::dead`, to be closed at the end of the iteration.
    dead: bool,
}

/// All connections by fd, plus the fds that have output waiting for this iteration's send.
struct Connections {
    slots: Vec<Option<Connection>>,
    dirty: Vec<RawFd>,
}

impl Connections {
    fn get(&mut self, fd: RawFd) -> Option<&mut Connection> {
        self.slots.get_mut(fd as usize).and_then(Option::as_mut)
    }

    /// Appends `bytes` to the connection's output and schedules its send.
    fn queue(&mut self, fd: RawFd, bytes: &[u8]) {
        let Some(connection) = self.slots.get_mut(fd as usize).and_then(Option::as_mut) else {
            return;
        };
        if connection.dead {
            return;
        }
        connection.output.extend_from_slice(bytes);
        if !connection.dirty {
            connection.dirty = true;
            self.dirty.push(fd);
        }
    }
}

struct Server {
    epoll: OwnedFd,
    listener: TcpListener,
    connections: Connections,
    /// Subscribers by exact topic, stored as the raw bytes between the JSON quotes.
    topics: HashMap<Box<[u8]>, Vec<RawFd>>,
    dead: Vec<RawFd>,
    /// Scratch buffer for building one outgoing frame.
    frame: Vec<u8>,
    /// Buffer of `READ_SIZE` bytes that every `recv()` reads into.
    read_buffer: Vec<u8>,
}

/// The fields of one request, each the raw JSON text from the request.
struct Request<'a> {
    action: &'a [u8],
    topic: Option<&'a [u8]>,
    data: Option<&'a [u8]>,
    id: Option<&'a [u8]>,
}

/// The parsed header of one client frame.
struct FrameHeader {
    opcode: u8,
    mask: [u8; 4],
    payload: Range<usize>,
}

enum FrameParse {
    Complete(FrameHeader),
    Incomplete,
    Invalid,
}

fn main() {
    let listen = match parse_listen(env::args().skip(1)) {
        Ok(listen) => listen,
        Err(message) => {
            eprintln!("nexus-yardstick: {message}");
            eprintln!("usage: nexus-yardstick [--listen ADDR]   (default {DEFAULT_LISTEN})");
            process::exit(2);
        }
    };
    let result = Server::bind(listen).and_then(|mut server| {
        eprintln!("nexus-yardstick: listening on {listen} (a measuring stick, not a broker)");
        server.run()
    });
    if let Err(error) = result {
        eprintln!("nexus-yardstick: failed on {listen}: {error}");
        process::exit(1);
    }
}

fn parse_listen(mut args: impl Iterator<Item = String>) -> Result<SocketAddr, String> {
    let mut listen = DEFAULT_LISTEN.to_string();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "-h" | "--help" => return Err("a minimal epoll WebSocket pub/sub server".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    listen
        .parse()
        .map_err(|error| format!("invalid --listen address {listen:?}: {error}"))
}

/// Converts a libc return value into an `io::Result`, reading errno on -1.
fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

impl Server {
    fn bind(listen: SocketAddr) -> io::Result<Server> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        // Linux accepts a second listen() on a listening socket and applies the new backlog.
        check(unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) })?;

        // SAFETY: epoll_create1 returns a new fd that nothing else owns.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let server = Server {
            epoll,
            listener,
            connections: Connections {
                slots: Vec::new(),
                dirty: Vec::new(),
            },
            topics: HashMap::new(),
            dead: Vec::new(),
            frame: Vec::with_capacity(4096),
            read_buffer: vec![0; READ_SIZE],
        };
        server.epoll_control(
            libc::EPOLL_CTL_ADD,
            server.listener.as_raw_fd(),
            LISTENER_TOKEN,
            false,
        )?;
        Ok(server)
    }

    fn epoll_control(
        &self,
        operation: i32,
        fd: RawFd,
        token: u64,
        writable: bool,
    ) -> io::Result<()> {
        let mut flags = libc::EPOLLIN as u32;
        if writable {
            flags |= libc::EPOLLOUT as u32;
        }
        let mut event = libc::epoll_event {
            events: flags,
            u64: token,
        };
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), operation, fd, &mut event) })?;
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        loop {
            let count = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    MAX_EVENTS as i32,
                    -1,
                )
            };
            let count = match check(count) {
                Ok(count) => count as usize,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };

            for event in &events[..count] {
                let (token, flags) = (event.u64, event.events);
                if token == LISTENER_TOKEN {
                    self.accept_all();
                    continue;
                }
                let fd = token as RawFd;
                if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                    self.read_once(fd);
                }
                if flags & libc::EPOLLOUT as u32 != 0 {
                    self.connections.queue(fd, &[]);
                }
            }

            // Writes come after all reads, so each socket gets one send() per iteration.
            self.flush_dirty();
            self.close_dead();
        }
    }

    fn accept_all(&mut self) {
        loop {
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    flags,
                )
            };
            if fd < 0 {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted => continue,
                    // NOTE: on EMFILE the level-triggered listener fires again at
                    // once, so the loop spins until a connection closes.
                    _ => {
                        eprintln!("nexus-yardstick: accept failed: {error}");
                        return;
                    }
                }
            }
            // SAFETY: accept4 returned a new fd that nothing else owns.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            self.add_connection(socket);
        }
    }

    fn add_connection(&mut self, socket: OwnedFd) {
        let fd = socket.as_raw_fd();
        let one: libc::c_int = 1;
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        if let Err(error) = self.epoll_control(libc::EPOLL_CTL_ADD, fd, fd as u64, false) {
            eprintln!("nexus-yardstick: epoll_ctl add failed for fd {fd}: {error}");
            return;
        }

        let slots = &mut self.connections.slots;
        if slots.len() <= fd as usize {
            slots.resize_with(fd as usize + 1, || None);
        }
        slots[fd as usize] = Some(Connection {
            socket,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            upgraded: false,
            topics: Vec::new(),
            dirty: false,
            writable_armed: false,
            closing: false,
            dead: false,
        });
    }

    /// Marks the connection to be closed at the end of this loop iteration.
    fn kill(&mut self, fd: RawFd) {
        if let Some(connection) = self.connections.get(fd) {
            if !connection.dead {
                connection.dead = true;
                self.dead.push(fd);
            }
        }
    }

    /// Reads once from the socket and handles every complete message received so far.
    ///
    /// Bytes land in the shared `read_buffer`; only an incomplete frame left
    /// at the end is copied into the connection's own `input`, so idle
    /// connections hold no read buffer.
    fn read_once(&mut self, fd: RawFd) {
        let Some(connection) = self.connections.get(fd) else {
            return;
        };
        if connection.dead {
            return;
        }
        let buffer = &mut self.read_buffer;
        let received = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        let received = match received {
            0 => return self.kill(fd),
            n if n < 0 => {
                let error = io::Error::last_os_error();
                let retry = matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                );
                if !retry {
                    self.kill(fd);
                }
                return;
            }
            n => n as usize,
        };
        if connection.closing {
            return;
        }

        // Both buffers are taken out so that handling them can borrow other connections.
        let mut pending = mem::take(&mut connection.input);
        let mut buffer = mem::take(&mut self.read_buffer);
        let from_buffer = pending.is_empty();
        let bytes = if from_buffer {
            &mut buffer[..received]
        } else {
            pending.extend_from_slice(&buffer[..received]);
            &mut pending[..]
        };
        let consumed = self.handle_input(fd, bytes);
        if from_buffer {
            pending.extend_from_slice(&buffer[consumed..received]);
        } else {
            pending.drain(..consumed);
        }
        self.read_buffer = buffer;
        if let Some(connection) = self.connections.get(fd) {
            connection.input = pending;
        }
    }

    /// Handles the upgrade request or frames in `bytes`, returning how many bytes it used.
    fn handle_input(&mut self, fd: RawFd, bytes: &mut [u8]) -> usize {
        let mut consumed = 0;
        if self.connections.get(fd).is_some_and(|c| !c.upgraded) {
            consumed = self.upgrade(fd, bytes);
        }
        if self
            .connections
            .get(fd)
            .is_some_and(|c| c.upgraded && !c.closing)
        {
            consumed += self.handle_frames(fd, &mut bytes[consumed..]);
        }
        consumed
    }

    /// Replies to the HTTP upgrade request with 101, or with 400 when it has no
    /// Sec-WebSocket-Key, and returns how many input bytes the request used.
    fn upgrade(&mut self, fd: RawFd, input: &[u8]) -> usize {
        let Some(end) = memmem::find(input, b"\r\n\r\n") else {
            if input.len() > MAX_HANDSHAKE {
                self.kill(fd);
            }
            return 0;
        };
        let request = &input[..end];
        let key = request
            .split(|&byte| byte == b'\n')
            .filter_map(|line| {
                let colon = memchr::memchr(b':', line)?;
                let name = &line[..colon];
                name.eq_ignore_ascii_case(b"sec-websocket-key")
                    .then(|| line[colon + 1..].trim_ascii())
            })
            .next();

        let Some(key) = key else {
            self.connections.queue(
                fd,
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            if let Some(connection) = self.connections.get(fd) {
                connection.closing = true;
            }
            return end + 4;
        };

        let accept = accept_key(key);
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        self.connections.queue(fd, response.as_bytes());
        if let Some(connection) = self.connections.get(fd) {
            connection.upgraded = true;
        }
        end + 4
    }

    /// Handles every complete frame in `input`, returning how many bytes they used.
    fn handle_frames(&mut self, fd: RawFd, input: &mut [u8]) -> usize {
        let mut position = 0;
        loop {
            let header = match parse_frame_header(&input[position..]) {
                FrameParse::Complete(header) => header,
                FrameParse::Incomplete => return position,
                FrameParse::Invalid => {
                    self.kill(fd);
                    return input.len();
                }
            };
            let payload_range = position + header.payload.start..position + header.payload.end;
            position = payload_range.end;
            let payload = &mut input[payload_range];
            unmask(payload, header.mask);

            match header.opcode {
                OPCODE_TEXT => self.handle_text(fd, payload),
                OPCODE_PING => {
                    build_frame(&mut self.frame, OPCODE_PONG, &[payload]);
                    self.connections.queue(fd, &self.frame);
                }
                OPCODE_CLOSE => {
                    // Echo the status code, as RFC 6455 section 5.5.1 requires, then stop reading.
                    let code = &payload[..payload.len().min(2)];
                    build_frame(&mut self.frame, OPCODE_CLOSE, &[code]);
                    self.connections.queue(fd, &self.frame);
                    if let Some(connection) = self.connections.get(fd) {
                        connection.closing = true;
                    }
                    return input.len();
                }
                // Binary, pong and continuation frames are ignored.
                _ => {}
            }
        }
    }

    fn handle_text(&mut self, fd: RawFd, text: &[u8]) {
        let Some(request) = parse_request(text) else {
            return self.reply_error(fd, b"invalid_request", UNHANDLED_REQUEST);
        };
        let id = request.id;
        match (request.action, request.topic, request.data) {
            (b"\"SUBSCRIBE\"", Some(topic), _) => {
                self.subscribe(fd, string_contents(topic));
                self.reply(fd, b"subscribed", Some(topic), id);
            }
            (b"\"UNSUBSCRIBE\"", Some(topic), _) => {
                if self.unsubscribe(fd, string_contents(topic)) {
                    self.reply(fd, b"unsubscribed", Some(topic), id);
                } else {
                    self.reply_error(
                        fd,
                        b"not_subscribed",
                        b"this connection has no such subscription",
                    );
                }
            }
            (b"\"PUBLISH\"", Some(topic), Some(data)) => {
                self.publish(string_contents(topic), data);
                if id.is_some() {
                    self.reply(fd, b"published", Some(topic), id);
                }
            }
            (b"\"PING\"", _, _) => self.reply(fd, b"pong", None, id),
            _ => self.reply_error(fd, b"invalid_request", UNHANDLED_REQUEST),
        }
    }

    fn subscribe(&mut self, fd: RawFd, topic: &[u8]) {
        let Some(connection) = self.connections.get(fd) else {
            return;
        };
        if connection.topics.iter().any(|held| **held == *topic) {
            return;
        }
        connection.topics.push(topic.into());
        self.topics.entry(topic.into()).or_default().push(fd);
    }

    /// Removes the subscription, returning false when the connection did not hold it.
    fn unsubscribe(&mut self, fd: RawFd, topic: &[u8]) -> bool {
        let Some(connection) = self.connections.get(fd) else {
            return false;
        };
        let Some(index) = connection.topics.iter().position(|held| **held == *topic) else {
            return false;
        };
        connection.topics.swap_remove(index);
        remove_subscriber(&mut self.topics, topic, fd);
        true
    }

    /// Builds the delivery frame once and appends it to every subscriber's output.
    fn publish(&mut self, topic: &[u8], data: &[u8]) {
        let Some(subscribers) = self.topics.get(topic) else {
            return;
        };
        let parts: [&[u8]; 5] = [
            b"{\"type\":\"message\",\"topic\":\"",
            topic,
            b"\",\"data\":",
            data,
            b"}",
        ];
        build_frame(&mut self.frame, OPCODE_TEXT, &parts);
        for &subscriber in subscribers {
            self.connections.queue(subscriber, &self.frame);
        }
    }

    /// Sends `{"type":KIND,"topic":TOPIC,"id":ID}`, leaving out the fields that are None.
    fn reply(&mut self, fd: RawFd, kind: &[u8], topic: Option<&[u8]>, id: Option<&[u8]>) {
        let mut parts: Vec<&[u8]> = vec![b"{\"type\":\"", kind, b"\""];
        if let Some(topic) = topic {
            parts.extend([b",\"topic\":".as_slice(), topic]);
        }
        if let Some(id) = id {
            parts.extend([b",\"id\":".as_slice(), id]);
        }
        parts.push(b"}");
        build_frame(&mut self.frame, OPCODE_TEXT, &parts);
        self.connections.queue(fd, &self.frame);
    }

    fn reply_error(&mut self, fd: RawFd, code: &[u8], message: &[u8]) {
        let parts: [&[u8]; 5] = [
            b"{\"type\":\"error\",\"code\":\"",
            code,
            b"\",\"message\":\"",
            message,
            b"\"}",
        ];
        build_frame(&mut self.frame, OPCODE_TEXT, &parts);
        self.connections.queue(fd, &self.frame);
    }

    /// Sends the pending output of every dirty connection with one send() each.
    fn flush_dirty(&mut self) {
        let mut dirty = mem::take(&mut self.connections.dirty);
        for &fd in &dirty {
            let Some(connection) = self.connections.get(fd) else {
                continue;
            };
            connection.dirty = false;
            if connection.dead {
                continue;
            }
            match send_pending(connection) {
                Ok(()) => {}
                Err(_) => {
                    self.kill(fd);
                    continue;
                }
            }
            self.update_after_send(fd);
        }
        dirty.clear();
        // Keep the allocation for the next iteration.
        if self.connections.dirty.is_empty() {
            self.connections.dirty = dirty;
        }
    }

    /// Registers EPOLLOUT while output is left over, and closes a flushed closing connection.
    fn update_after_send(&mut self, fd: RawFd) {
        let Some(connection) = self.connections.get(fd) else {
            return;
        };
        let flushed = connection.sent == connection.output.len();
        if flushed {
            connection.output.clear();
            connection.sent = 0;
            // Give back memory after a backlog, but keep a buffer for the common case.
            connection.output.shrink_to(OUTPUT_KEEP);
        } else if connection.sent > connection.output.len() / 2 {
            connection.output.drain(..connection.sent);
            connection.sent = 0;
        }
        let closing = connection.closing;
        if flushed == connection.writable_armed {
            connection.writable_armed = !flushed;
            if self
                .epoll_control(libc::EPOLL_CTL_MOD, fd, fd as u64, !flushed)
                .is_err()
            {
                return self.kill(fd);
            }
        }
        if flushed && closing {
            self.kill(fd);
        }
    }

    fn close_dead(&mut self) {
        for fd in mem::take(&mut self.dead) {
            let Some(connection) = self.connections.slots[fd as usize].take() else {
                continue;
            };
            for topic in &connection.topics {
                remove_subscriber(&mut self.topics, topic, fd);
            }
            // Dropping the connection closes the socket, which also removes it from epoll.
            drop(connection.socket);
        }
    }
}

/// Sends the unsent part of the output with one send(); EAGAIN is not an error.
fn send_pending(connection: &mut Connection) -> io::Result<()> {
    let pending = &connection.output[connection.sent..];
    if pending.is_empty() {
        return Ok(());
    }
    let fd = connection.socket.as_raw_fd();
    let sent = unsafe {
        libc::send(
            fd,
            pending.as_ptr().cast(),
            pending.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if sent >= 0 {
        connection.sent += sent as usize;
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
        _ => Err(error),
    }
}

fn remove_subscriber(topics: &mut HashMap<Box<[u8]>, Vec<RawFd>>, topic: &[u8], fd: RawFd) {
    let Some(subscribers) = topics.get_mut(topic) else {
        return;
    };
    if let Some(index) = subscribers.iter().position(|&subscriber| subscriber == fd) {
        subscribers.swap_remove(index);
    }
    if subscribers.is_empty() {
        topics.remove(topic);
    }
}

/// Computes Sec-WebSocket-Accept: base64 of the SHA-1 of the key and the GUID.
fn accept_key(key: &[u8]) -> String {
    let mut hasher = sha1_smol::Sha1::new();
    hasher.update(key);
    hasher.update(WEBSOCKET_GUID);
    base64::engine::general_purpose::STANDARD.encode(hasher.digest().bytes())
}

/// Parses a client frame header (RFC 6455 section 5.2). Client frames must be masked.
fn parse_frame_header(input: &[u8]) -> FrameParse {
    if input.len() < 2 {
        return FrameParse::Incomplete;
    }
    let opcode = input[0] & 0x0F;
    let masked = input[1] & 0x80 != 0;
    if !masked {
        return FrameParse::Invalid;
    }

    let (length, mut offset) = match input[1] & 0x7F {
        126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as u64, 4),
        127 if input.len() >= 10 => {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&input[2..10]);
            (u64::from_be_bytes(bytes), 10)
        }
        126 | 127 => return FrameParse::Incomplete,
        short => (short as u64, 2),
    };
    if length > MAX_PAYLOAD {
        return FrameParse::Invalid;
    }

    if input.len() < offset + 4 {
        return FrameParse::Incomplete;
    }
    let mask = [
        input[offset],
        input[offset + 1],
        input[offset + 2],
        input[offset + 3],
    ];
    offset += 4;
    let end = offset + length as usize;
    if input.len() < end {
        return FrameParse::Incomplete;
    }
    FrameParse::Complete(FrameHeader {
        opcode,
        mask,
        payload: offset..end,
    })
}

/// XORs the payload with the client's masking key, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key index restarts at 0.
    for (index, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[index % 4];
    }
}

/// Writes one unmasked, unfragmented server frame whose payload is `parts` joined.
fn build_frame(frame: &mut Vec<u8>, opcode: u8, parts: &[&[u8]]) {
    let length: usize = parts.iter().map(|part| part.len()).sum();
    frame.clear();
    frame.push(0x80 | opcode);
    if length < 126 {
        frame.push(length as u8);
    } else if length <= u16::MAX as usize {
        frame.push(126);
        frame.extend_from_slice(&(length as u16).to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(length as u64).to_be_bytes());
    }
    for part in parts {
        frame.extend_from_slice(part);
    }
}

/// Finds the request fields without a JSON parse.
///
/// `data` is located first and its value skipped as a whole, and the other
/// keys are searched for only outside it, so a payload that contains
/// `"topic"` or `"id"` is not mistaken for a request field. Keys are matched
/// with their quotes; unknown fields are ignored.
fn parse_request(text: &[u8]) -> Option<Request<'_>> {
    let data_range = match memmem::find(text, b"\"data\"") {
        Some(key) => {
            let start = value_start(text, key + b"\"data\"".len())?;
            start..skip_value(text, start)?
        }
        None => text.len()..text.len(),
    };
    let field = |key: &[u8]| {
        find_field(&text[..data_range.start], key)
            .or_else(|| find_field(&text[data_range.end..], key))
    };
    Some(Request {
        action: field(b"\"action\"")?,
        topic: field(b"\"topic\""),
        data: (!data_range.is_empty()).then(|| &text[data_range.clone()]),
        id: field(b"\"id\""),
    })
}

/// Returns the raw value text of `key` in `text`, when the key is followed by `:` and a value.
fn find_field<'a>(text: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = value_start(text, memmem::find(text, key)? + key.len())?;
    Some(&text[start..skip_value(text, start)?])
}

/// Skips whitespace, one `:` and more whitespace after a key, returning where the value starts.
fn value_start(text: &[u8], after_key: usize) -> Option<usize> {
    let is_space = |byte: &u8| matches!(byte, b' ' | b'\t' | b'\r' | b'\n');
    let colon = after_key + text[after_key..].iter().position(|byte| !is_space(byte))?;
    if text[colon] != b':' {
        return None;
    }
    Some(colon + 1 + text[colon + 1..].iter().position(|byte| !is_space(byte))?)
}

/// Returns the end of the JSON value starting at `start`: a string, a nested
/// object or array (brackets counted outside strings), or a bare literal.
fn skip_value(text: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut index = start;
    while index < text.len() {
        match text[index] {
            b'"' => {
                index = skip_string(text, index)?;
                if depth == 0 {
                    return Some(index);
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth == 0 => return Some(index),
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(index + 1);
                }
            }
            b',' | b' ' | b'\t' | b'\r' | b'\n' if depth == 0 => return Some(index),
            _ => {}
        }
        index += 1;
    }
    (depth == 0 && index > start).then_some(index)
}

/// Returns the index after the closing quote of the string opening at `open`.
fn skip_string(text: &[u8], open: usize) -> Option<usize> {
    let mut index = open + 1;
    loop {
        index += memchr::memchr2(b'"', b'\\', &text[index.min(text.len())..])?;
        if text[index] == b'"' {
            return Some(index + 1);
        }
        index += 2;
    }
}

/// Returns the bytes between the quotes of a raw JSON string, or the raw text otherwise.
fn string_contents(raw: &[u8]) -> &[u8] {
    match raw {
        [b'"', inner @ .., b'"'] => inner,
        _ => raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_sample() {
        // The sample handshake of RFC 6455 section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn request_fields_found() {
        let text =
            br#"{"action":"PUBLISH","topic":"a.b","data":{"x":[1,"}"],"topic":"no"},"id":7}"#;
        let request = parse_request(text).expect("request parses");
        assert_eq!(request.action, b"\"PUBLISH\"");
        assert_eq!(request.topic, Some(&b"\"a.b\""[..]));
        assert_eq!(request.data, Some(&br#"{"x":[1,"}"],"topic":"no"}"#[..]));
        assert_eq!(request.id, Some(&b"7"[..]));
    }

    #[test]
    fn request_data_scalar_and_spaces() {
        let text = br#"{ "data" : "he said \"hi\"" , "action" : "PUBLISH", "topic": "t" }"#;
        let request = parse_request(text).expect("request parses");
        assert_eq!(request.data, Some(&br#""he said \"hi\"""#[..]));
        assert_eq!(string_contents(request.topic.unwrap()), b"t");
        assert_eq!(request.id, None);
    }

    #[test]
    fn frame_roundtrip_unmasks() {
        let mask = [1, 2, 3, 4];
        let mut payload: Vec<u8> = b"hello, yardstick"
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        let mut frame = vec![0x81, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.append(&mut payload);
        let FrameParse::Complete(header) = parse_frame_header(&frame) else {
            panic!("frame should be complete");
        };
        let payload = &mut frame[header.payload.clone()];
        unmask(payload, header.mask);
        assert_eq!(payload, b"hello, yardstick");
        assert!(matches!(
            parse_frame_header(&frame[..5]),
            FrameParse::Incomplete
        ));
    }
}
