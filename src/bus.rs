//! Core-to-core messaging: one lock-free inbox per worker core.
//!
//! Each inbox is a crossbeam channel plus an [`AtomicWaker`]. Any thread can send: other worker
//! cores and the cluster link's thread, which does not run a glommio executor. glommio's own
//! shared channels need both ends inside glommio executors, so they cannot serve the link;
//! crossbeam serves both with one mechanism. A glommio waker woken from a foreign thread queues
//! the wake-up and writes the executor's eventfd only when that executor sleeps, and the
//! `AtomicWaker` hands the waker out once per wake-up, so a burst of sends costs one wake-up.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// A message published on some core or node, encoded once for every subscriber.
#[derive(Debug)]
pub struct Publication {
    /// The topic the message was published to.
    pub topic: Box<str>,
    /// The complete WebSocket text frame of the delivery, header included.
    pub frame: Box<[u8]>,
}

/// A message from one core to another.
#[derive(Debug)]
pub enum CoreMessage {
    /// Deliver a publication to this core's matching subscribers.
    Deliver(Arc<Publication>),
    /// Stop reading requests from clients, so that no new publish starts on this core.
    StopIntake,
    /// Stop accepting, close every connection with 1001 and stop the core.
    Shutdown,
}

/// The sending side of one core's inbox; cheap to clone and usable from any thread.
#[derive(Debug, Clone)]
pub struct CoreSender {
    sender: Sender<CoreMessage>,
    waker: Arc<AtomicWaker>,
}

/// The receiving side of one core's inbox, owned by that core.
#[derive(Debug)]
pub struct CoreReceiver {
    receiver: Receiver<CoreMessage>,
    waker: Arc<AtomicWaker>,
}

/// Creates the inbox of one core.
pub fn inbox() -> (CoreSender, CoreReceiver) {
    // NOTE: the inbox is unbounded, so a core that falls behind the publishes of the others
    // buffers them without limit. Slow connections are bounded by their own outbound queues,
    // so this only grows when a whole core is saturated.
    let (sender, receiver) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        CoreSender {
            sender,
            waker: Arc::clone(&waker),
        },
        CoreReceiver { receiver, waker },
    )
}

impl CoreSender {
    /// Sends a message and wakes the receiving core; a stopped core drops it.
    pub fn send(&self, message: CoreMessage) {
        if self.sender.send(message).is_ok() {
            self.waker.wake();
        }
    }
}

impl CoreReceiver {
    /// Waits until at least one message is queued, then moves up to `max` of them into `batch`.
    pub async fn recv_batch(&self, batch: &mut Vec<CoreMessage>, max: usize) {
        poll_fn(|cx| {
            if self.drain_into(batch, max) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A message sent between the drain and the register would otherwise go unnoticed.
            if self.drain_into(batch, max) {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await
    }

    fn drain_into(&self, batch: &mut Vec<CoreMessage>, max: usize) -> bool {
        while batch.len() < max {
            match self.receiver.try_recv() {
                Ok(message) => batch.push(message),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        !batch.is_empty()
    }
}
