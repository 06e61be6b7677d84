//! RESP2, the Redis wire protocol, as far as the link uses it: commands are arrays of bulk
//! strings, and replies are read from a buffered socket one complete value at a time.
//!
//! The link writes commands straight into its own buffers so that a PUBLISH of a large message
//! copies the message once, and it reads pub/sub pushes and pipelined replies in the same loop.
//! The `redis` crate's connections cannot batch many channels into one SUBSCRIBE and do not
//! understand sharded pub/sub pushes, so the link does not use them.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Deepest nesting of arrays accepted in a reply. `CLUSTER SLOTS` nests three levels, pushes one.
const MAX_DEPTH: usize = 8;

/// Largest bulk string accepted, in bytes: Redis' own `proto-max-bulk-len` default (512 MiB).
const MAX_BULK: usize = 512 << 20;

/// Bytes requested from the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// One RESP2 value sent by Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`, `+PONG`.
    Simple(String),
    /// `-ERR ...`, `-MOVED ...`: the command failed, the connection stays usable.
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$3\r\nfoo`, or `$-1` (None).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...`, or `*-1` (None).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Returns the bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Bulk(Some(bytes)) => Some(bytes),
            Reply::Simple(text) => Some(text.as_bytes()),
            _ => None,
        }
    }

    /// Returns the elements of an array.
    pub fn as_array(&self) -> Option<&[Reply]> {
        match self {
            Reply::Array(Some(items)) => Some(items),
            _ => None,
        }
    }
}

/// Bytes from Redis that are not valid RESP2, after which the connection cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[error("invalid RESP reply from Redis: {0}")]
pub struct ProtocolError(&'static str);

impl From<ProtocolError> for io::Error {
    fn from(error: ProtocolError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

/// Appends the header of a command of `args` arguments.
pub fn push_array_header(out: &mut Vec<u8>, args: usize) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(args).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends the header of a bulk string of `len` bytes; the caller appends the bytes and `\r\n`.
pub fn push_bulk_header(out: &mut Vec<u8>, len: usize) {
    out.push(b'$');
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends one bulk string argument.
pub fn push_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    push_bulk_header(out, bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends a whole command.
pub fn push_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    push_array_header(out, args.len());
    for arg in args {
        push_bulk(out, arg.as_ref());
    }
}

/// Parses the value at the start of `buf`, returning it with the number of bytes it took, or
/// `None` when the buffer ends before the value does.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let mut cursor = 0;
    match parse_value(buf, &mut cursor, 0)? {
        Some(reply) => Ok(Some((reply, cursor))),
        None => Ok(None),
    }
}

fn parse_value(
    buf: &[u8],
    cursor: &mut usize,
    depth: usize,
) -> Result<Option<Reply>, ProtocolError> {
    let Some(line) = read_line(buf, cursor)? else {
        return Ok(None);
    };
    let (kind, rest) = line.split_first().ok_or(ProtocolError("empty line"))?;
    let reply = match kind {
        b'+' => Reply::Simple(text(rest)?),
        b'-' => Reply::Error(text(rest)?),
        b':' => Reply::Integer(integer(rest)?),
        b'$' => match length(rest, MAX_BULK)? {
            None => Reply::Bulk(None),
            Some(len) => {
                // The bytes and their trailing CRLF must both be buffered.
                if buf.len() < *cursor + len + 2 {
                    return Ok(None);
                }
                if &buf[*cursor + len..*cursor + len + 2] != b"\r\n" {
                    return Err(ProtocolError("bulk string without CRLF"));
                }
                let bytes = buf[*cursor..*cursor + len].to_vec();
                *cursor += len + 2;
                Reply::Bulk(Some(bytes))
            }
        },
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(ProtocolError("arrays nested too deeply"));
            }
            match length(rest, buf.len())? {
                None => Reply::Array(None),
                Some(count) => {
                    let mut items = Vec::with_capacity(count);
                    for _ in 0..count {
                        match parse_value(buf, cursor, depth + 1)? {
                            Some(item) => items.push(item),
                            None => return Ok(None),
                        }
                    }
                    Reply::Array(Some(items))
                }
            }
        }
        _ => return Err(ProtocolError("unknown type byte")),
    };
    Ok(Some(reply))
}

/// Returns the line at `cursor` without its CRLF and moves the cursor past it.
fn read_line<'a>(buf: &'a [u8], cursor: &mut usize) -> Result<Option<&'a [u8]>, ProtocolError> {
    let rest = &buf[*cursor..];
    let Some(end) = rest.iter().position(|&byte| byte == b'\n') else {
        return Ok(None);
    };
    if end == 0 || rest[end - 1] != b'\r' {
        return Err(ProtocolError("line without CRLF"));
    }
    *cursor += end + 1;
    Ok(Some(&rest[..end - 1]))
}

fn text(bytes: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError("status line is not UTF-8"))
}

fn integer(bytes: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(ProtocolError("invalid integer"))
}

/// Parses a bulk or array length: -1 is `None`, other negatives and values above `max` fail.
fn length(bytes: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    match integer(bytes)? {
        -1 => Ok(None),
        len if len < 0 => Err(ProtocolError("negative length")),
        len if len as u64 > max as u64 => Err(ProtocolError("length out of range")),
        len => Ok(Some(len as usize)),
    }
}

/// Reads replies from the receiving half of a connection.
///
/// [`RespReader::next`] is cancel safe: the buffer and the read position live in the reader, so
/// a `select!` that drops the future loses no bytes.
pub struct RespReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
}

impl<R: AsyncRead + Unpin> RespReader<R> {
    /// Wraps the receiving half of a connection.
    pub fn new(inner: R) -> Self {
        RespReader {
            inner,
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
        }
    }

    /// Returns the next complete reply, reading from the socket as needed. End of stream is
    /// `UnexpectedEof`, since Redis never closes a healthy connection by itself.
    pub async fn next(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, used)) = parse(&self.buf[self.start..])? {
                self.start += used;
                return Ok(reply);
            }
            self.compact();
            self.buf.reserve(READ_CHUNK);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "Redis closed the connection",
                ));
            }
        }
    }

    /// Moves unread bytes to the front of the buffer once the consumed part dominates it.
    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > READ_CHUNK && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Reply {
        let (reply, used) = parse(bytes).unwrap().expect("complete reply");
        assert_eq!(used, bytes.len(), "bytes consumed");
        reply
    }

    #[test]
    fn command_encoding_is_array_of_bulks() {
        let mut out = Vec::new();
        push_command(&mut out, &["PUBLISH", "nexus:a", ""]);
        assert_eq!(out, b"*3\r\n$7\r\nPUBLISH\r\n$7\r\nnexus:a\r\n$0\r\n\r\n");
    }

    #[test]
    fn scalar_replies_parse() {
        assert_eq!(parse_all(b"+OK\r\n"), Reply::Simple("OK".into()));
        assert_eq!(parse_all(b"-ERR no\r\n"), Reply::Error("ERR no".into()));
        assert_eq!(parse_all(b":-12\r\n"), Reply::Integer(-12));
        assert_eq!(parse_all(b"$-1\r\n"), Reply::Bulk(None));
        assert_eq!(
            parse_all(b"$3\r\na\r\n\r\n"),
            Reply::Bulk(Some(b"a\r\n".to_vec()))
        );
    }

    #[test]
    fn push_message_parses() {
        let bytes = b"*3\r\n$7\r\nmessage\r\n$7\r\nnexus:a\r\n$2\r\nhi\r\n";
        let reply = parse_all(bytes);
        let items = reply.as_array().unwrap();
        assert_eq!(items[0].as_bytes(), Some(&b"message"[..]));
        assert_eq!(items[2].as_bytes(), Some(&b"hi"[..]));
    }

    #[test]
    fn every_truncation_is_incomplete() {
        let bytes = b"*2\r\n*2\r\n:1\r\n$3\r\nabc\r\n+x\r\n";
        for end in 0..bytes.len() {
            assert!(
                parse(&bytes[..end]).unwrap().is_none(),
                "prefix of {end} bytes"
            );
        }
        assert!(parse(bytes).unwrap().is_some());
    }

    #[test]
    fn two_replies_in_one_buffer_parse_one_at_a_time() {
        let bytes = b":1\r\n:2\r\n";
        let (first, used) = parse(bytes).unwrap().unwrap();
        assert_eq!(first, Reply::Integer(1));
        assert_eq!(parse_all(&bytes[used..]), Reply::Integer(2));
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bytes in [
            &b"?x\r\n"[..],
            b"$3\r\nabcd\r\n",
            b"+OK\n",
            b":x\r\n",
            b"$-2\r\n",
        ] {
            assert!(
                parse(bytes).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn deep_nesting_is_an_error() {
        let bytes = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(parse(&bytes).is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reader_returns_replies_split_across_reads() {
        let (mut client, server) = tokio::io::duplex(8);
        let mut reader = RespReader::new(server);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"+PONG\r\n$5\r\nhello\r\n").await.unwrap();
        });
        assert_eq!(reader.next().await.unwrap(), Reply::Simple("PONG".into()));
        assert_eq!(
            reader.next().await.unwrap(),
            Reply::Bulk(Some(b"hello".to_vec()))
        );
        writer.await.unwrap();
        let end = reader.next().await.unwrap_err();
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
    }
}
