//! WebSocket client connections (RFC 6455): `ws://` URLs and the opening
//! handshake. Frames are in [`crate::frame`].

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::frame::{FrameReader, MaskSource};

/// GUID appended to the client key to compute `Sec-WebSocket-Accept`
/// (RFC 6455 section 1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Maximum size of the server's handshake response headers.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A parsed `ws://host:port/resource` URL with its resolved address.
#[derive(Clone, Debug)]
pub struct WsUrl {
    /// The URL as given on the command line.
    pub text: String,
    pub host: String,
    pub port: u16,
    /// Path and query sent in the request line, starting with `/`.
    pub resource: String,
    pub addr: SocketAddr,
}

impl WsUrl {
    /// Parses a `ws://` URL and resolves its host to the first address.
    pub fn parse(text: &str) -> Result<WsUrl, String> {
        let rest = text
            .strip_prefix("ws://")
            .ok_or_else(|| format!("invalid URL {text:?}: only ws:// URLs are supported"))?;
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, resource) = rest.split_at(split);
        let resource = match resource.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{resource}"),
            Some(_) => resource.to_string(),
        };
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| format!("invalid URL {text:?}: expected ws://HOST:PORT/PATH"))?;
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|error| format!("cannot resolve {host}: {error}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve {host}: no address"))?;
        Ok(WsUrl {
            text: text.to_string(),
            host,
            port,
            resource,
            addr,
        })
    }

    /// Returns a copy of this URL with another path and query.
    pub fn with_resource(&self, resource: String) -> WsUrl {
        WsUrl {
            resource,
            ..self.clone()
        }
    }

    /// Returns the `Host` header value.
    pub fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Splits `host:port` or `[v6]:port`; the port defaults to 80.
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => 80,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (authority, 80),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

/// Reasons a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    Io(io::Error),
    /// The server responded to the upgrade with a status other than 101.
    Status(u16),
    /// `Sec-WebSocket-Accept` is missing or does not match the key.
    InvalidAccept,
    /// The response head is not valid HTTP or is too long.
    InvalidResponse,
    /// The server closed the connection during the handshake.
    Closed,
    TimedOut,
}

impl ConnectError {
    /// Short stable name, used as a key in the results.
    pub fn kind(&self) -> String {
        match self {
            ConnectError::Io(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                "connection_refused".to_string()
            }
            ConnectError::Io(error) => format!("io_{:?}", error.kind()).to_lowercase(),
            ConnectError::Status(code) => format!("http_{code}"),
            ConnectError::InvalidAccept => "invalid_accept".to_string(),
            ConnectError::InvalidResponse => "invalid_response".to_string(),
            ConnectError::Closed => "closed_in_handshake".to_string(),
            ConnectError::TimedOut => "timed_out".to_string(),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Io(error) => write!(f, "{error}"),
            ConnectError::Status(code) => write!(f, "handshake rejected with HTTP {code}"),
            ConnectError::InvalidAccept => write!(f, "invalid Sec-WebSocket-Accept in response"),
            ConnectError::InvalidResponse => write!(f, "invalid HTTP response to the upgrade"),
            ConnectError::Closed => write!(f, "connection closed during the handshake"),
            ConnectError::TimedOut => write!(f, "handshake timed out"),
        }
    }
}

impl From<io::Error> for ConnectError {
    fn from(error: io::Error) -> Self {
        ConnectError::Io(error)
    }
}

/// Opens a TCP connection to `addr`, from `bind` when given, with Nagle off.
pub async fn connect_tcp(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        if ip.is_ipv4() {
            defer_port_choice(&socket)?;
        }
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on an IPv4 socket, so that binding to
/// port 0 leaves the choice of the local port to `connect`. Without it,
/// Linux picks the port at `bind` without knowing the destination, so it
/// needs a port that no other socket on that address holds, TIME_WAIT ones
/// included. With two source addresses and 19,000 connections closed by
/// the previous run, that search made setup take about 40 s and 60 CPU
/// seconds of the generator in place of about 1 s (docs/benchmarks.md).
fn defer_port_choice(socket: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let enable: libc::c_int = 1;
    // SAFETY: the descriptor is open for the lifetime of `socket`, and the
    // option value is a valid c_int of the length passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connects to `url` and performs the client handshake.
///
/// Bytes the server sent after its response head (a first message, for
/// example) stay in `reader`.
pub async fn connect(
    url: &WsUrl,
    bind: Option<IpAddr>,
    reader: &mut FrameReader,
    masks: &mut MaskSource,
) -> Result<TcpStream, ConnectError> {
    let mut stream = connect_tcp(url.addr, bind).await?;

    let mut key_bytes = [0u8; 16];
    key_bytes[..8].copy_from_slice(&masks.next_u64().to_le_bytes());
    key_bytes[8..].copy_from_slice(&masks.next_u64().to_le_bytes());
    let key = BASE64.encode(key_bytes);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        url.resource,
        url.host_header()
    );
    stream.write_all(request.as_bytes()).await?;

    reader.clear();
    loop {
        let read = stream.read(reader.spare()).await?;
        if read == 0 {
            return Err(ConnectError::Closed);
        }
        reader.filled(read);
        if let Some(head_len) = parse_response_head(reader.pending(), &key)? {
            reader.consume(head_len);
            return Ok(stream);
        }
        if reader.pending().len() > MAX_RESPONSE_HEAD {
            return Err(ConnectError::InvalidResponse);
        }
    }
}

/// Returns the length of a complete `101` response head, `None` when more
/// bytes are needed, or the reason the response is not an accepted upgrade.
fn parse_response_head(bytes: &[u8], key: &str) -> Result<Option<usize>, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ConnectError::InvalidResponse),
    };
    let code = response.code.unwrap_or(0);
    if code != 101 {
        return Err(ConnectError::Status(code));
    }
    let accept = response
        .headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .ok_or(ConnectError::InvalidAccept)?;
    if accept.value != expected_accept(key).as_bytes() {
        return Err(ConnectError::InvalidAccept);
    }
    Ok(Some(head_len))
}

/// Computes `Sec-WebSocket-Accept` for a client key (RFC 6455 section 4.2.2).
fn expected_accept(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_example() {
        // The key and accept value from RFC 6455 section 1.3.
        assert_eq!(
            expected_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn response_head_needs_101_and_accept() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nrest";
        assert_eq!(
            parse_response_head(good.as_bytes(), key).ok(),
            Some(Some(good.len() - 4))
        );
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 101 Switching", key),
            Ok(None)
        ));
        let busy = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n";
        assert!(matches!(
            parse_response_head(busy.as_bytes(), key),
            Err(ConnectError::Status(503))
        ));
        let wrong = "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: x\r\n\r\n";
        assert!(matches!(
            parse_response_head(wrong.as_bytes(), key),
            Err(ConnectError::InvalidAccept)
        ));
    }

    #[test]
    fn url_parsing_splits_host_port_and_resource() {
        let url = WsUrl::parse("ws://127.0.0.1:3001").expect("valid");
        assert_eq!(url.port, 3001);
        assert_eq!(url.resource, "/");
        let url = WsUrl::parse("ws://127.0.0.1:6001/app/key?protocol=7").expect("valid");
        assert_eq!(url.resource, "/app/key?protocol=7");
        let url = WsUrl::parse("ws://[::1]:3001?x=1").expect("valid");
        assert_eq!(url.host, "::1");
        assert_eq!(url.resource, "/?x=1");
        assert_eq!(url.host_header(), "[::1]:3001");
        assert!(WsUrl::parse("http://127.0.0.1:3001/").is_err());
        assert!(WsUrl::parse("ws://:3001/").is_err());
    }
}
