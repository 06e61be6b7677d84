//! A connection's outbound queue: shared frames waiting to be written, bounded in bytes, written
//! with one vectored system call per flush.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::rc::Rc;

/// Maximum frames per `sendmsg` call, the kernel's limit `UIO_MAXIOV`.
const MAX_IOVECS: usize = 1024;

/// Frames queued for one connection. Frames are shared with every other subscriber of the same
/// message on this core, so queuing one costs a reference count, not a copy.
#[derive(Debug, Default)]
pub struct Outbound {
    frames: VecDeque<Rc<[u8]>>,
    /// Bytes of the first frame already written.
    head_written: usize,
    /// Bytes queued and not yet written.
    pending: usize,
    queued_total: u64,
    written_total: u64,
}

/// Outcome of [`Outbound::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// The frame was queued.
    Queued,
    /// The frame would take the queue past its limit and was dropped.
    Full,
}

impl Outbound {
    /// Queues `frame` unless the queue would then hold more than `limit` bytes.
    pub fn push(&mut self, frame: Rc<[u8]>, limit: usize) -> Push {
        if self.pending + frame.len() > limit {
            return Push::Full;
        }
        self.push_unbounded(frame);
        Push::Queued
    }

    /// Queues `frame` whatever the queue holds; for small control frames and replies.
    pub fn push_unbounded(&mut self, frame: Rc<[u8]>) {
        self.pending += frame.len();
        self.queued_total += frame.len() as u64;
        self.frames.push_back(frame);
    }

    /// Returns whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Returns the bytes waiting to be written.
    pub fn pending_bytes(&self) -> usize {
        self.pending
    }

    /// Returns how many bytes were ever queued.
    pub fn queued_total(&self) -> u64 {
        self.queued_total
    }

    /// Returns how many bytes were ever written.
    pub fn written_total(&self) -> u64 {
        self.written_total
    }

    /// Drops every queued frame except a partly written first one, whose rest must still go out
    /// to keep the WebSocket stream well-formed.
    pub fn discard_unsent(&mut self) {
        let keep = usize::from(self.head_written > 0);
        while self.frames.len() > keep {
            if let Some(frame) = self.frames.pop_back() {
                self.pending -= frame.len();
            }
        }
    }

    /// Returns the unwritten part of the first frame.
    pub fn head(&self) -> Option<&[u8]> {
        self.frames.front().map(|frame| &frame[self.head_written..])
    }

    /// Records that `written` bytes from the front of the queue were sent.
    pub fn consume(&mut self, mut written: usize) {
        self.pending -= written;
        self.written_total += written as u64;
        while written > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.len() - self.head_written;
            if written < left {
                self.head_written += written;
                return;
            }
            written -= left;
            self.head_written = 0;
            self.frames.pop_front();
        }
    }

    /// Writes queued frames to the socket `fd` until the queue is empty (`Ok(true)`) or the
    /// socket would block (`Ok(false)`).
    pub fn write_to(&mut self, fd: RawFd) -> io::Result<bool> {
        // Left uninitialized: zeroing 16 KiB before every call would cost more than the
        // few entries a typical flush fills.
        let mut iovecs = [const { MaybeUninit::<libc::iovec>::uninit() }; MAX_IOVECS];
        while !self.frames.is_empty() {
            let mut count = 0;
            for (slot, frame) in iovecs.iter_mut().zip(&self.frames) {
                let skip = if count == 0 { self.head_written } else { 0 };
                slot.write(libc::iovec {
                    iov_base: frame[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: frame.len() - skip,
                });
                count += 1;
            }
            // SAFETY: the loop above initialized the first `count` entries.
            let filled =
                unsafe { std::slice::from_raw_parts(iovecs.as_ptr().cast::<libc::iovec>(), count) };
            match send_vectored(fd, filled) {
                Ok(written) => self.consume(written),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }
}

/// Calls `sendmsg` without blocking and without raising SIGPIPE. A single buffer goes through
/// `send`, which spares the kernel copying in the message header and the iovec array.
fn send_vectored(fd: RawFd, iovecs: &[libc::iovec]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: a zeroed msghdr is valid; it points at `iovecs`, which outlives the call, and
    // each iovec points into a frame that the queue keeps alive until the call returns.
    let written = unsafe {
        if let [single] = iovecs {
            libc::send(fd, single.iov_base, single.iov_len, flags)
        } else {
            let mut message: libc::msghdr = std::mem::zeroed();
            message.msg_iov = iovecs.as_ptr() as *mut libc::iovec;
            message.msg_iovlen = iovecs.len() as _;
            libc::sendmsg(fd, &message, flags)
        }
    };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(written as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Rc<[u8]> {
        Rc::from(bytes)
    }

    #[test]
    fn push_respects_limit() {
        let mut out = Outbound::default();
        assert_eq!(out.push(frame(b"abcd"), 6), Push::Queued);
        assert_eq!(out.push(frame(b"efg"), 6), Push::Full);
        assert_eq!(out.pending_bytes(), 4);
    }

    #[test]
    fn consume_spans_frames() {
        let mut out = Outbound::default();
        out.push_unbounded(frame(b"abc"));
        out.push_unbounded(frame(b"defg"));
        out.consume(4);
        assert_eq!(out.head(), Some(&b"efg"[..]));
        assert_eq!(out.pending_bytes(), 3);
        assert_eq!(out.written_total(), 4);
    }

    #[test]
    fn discard_keeps_partial_head() {
        let mut out = Outbound::default();
        out.push_unbounded(frame(b"abc"));
        out.push_unbounded(frame(b"def"));
        out.consume(1);
        out.discard_unsent();
        assert_eq!(out.head(), Some(&b"bc"[..]));
        assert_eq!(out.pending_bytes(), 2);
    }

    #[test]
    fn write_to_socket_pair() {
        let (left, right) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        let mut out = Outbound::default();
        out.push_unbounded(frame(b"hello "));
        out.push_unbounded(frame(b"world"));
        assert!(out.write_to(left.as_raw_fd()).unwrap());
        let mut received = [0u8; 11];
        use std::io::Read;
        (&right).read_exact(&mut received).unwrap();
        assert_eq!(&received, b"hello world");
        assert!(out.is_empty());
    }
}
