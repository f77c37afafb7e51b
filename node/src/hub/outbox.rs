//! A connection's bounded outbound queue, shared by every room it is in. Pushing never blocks
//! the publisher: when the queue is full (frames or bytes) the connection is marked slow and
//! its own task closes it, so one stuck client cannot hold memory or slow a room down.
//! A mutex-guarded `VecDeque` allocates nothing while idle (a tokio mpsc allocates a 32-slot
//! block per channel up front), which matters at tens of thousands of idle connections.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::protocol::close;
use crate::transport::Frame;

/// Queue slots an idle connection may keep after a burst (each slot is 32 bytes).
const IDLE_QUEUE_CAPACITY: usize = 8;

struct Queue {
    frames: VecDeque<Frame>,
    bytes: usize,
}

/// Why a connection was asked to close, where the close code alone does not say: the code
/// 4000 both sends a draining node's clients away and moves clients off a busy node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The code says it all.
    Code = 0,
    /// The cluster is evened out (`rebalance`): the client resumes on whichever node it reaches.
    Rebalance = 1,
}

/// State shared between a connection's task and everyone who queues to it.
pub struct ConnSignal {
    queue: Mutex<Queue>,
    max_frames: usize,
    max_bytes: usize,
    /// The requested close: its code in the low 16 bits, its [`CloseCause`] above.
    close_request: AtomicU32,
    /// Set once a frame was refused: the client has not seen everything it was sent.
    lost: AtomicBool,
    /// Wakes the connection's task: frames were queued or a close was requested.
    wake: Notify,
    metrics: Arc<Metrics>,
}

impl ConnSignal {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the connection to close with `code`; the first request wins.
    pub fn close(&self, code: u16) {
        self.close_for(code, CloseCause::Code);
    }

    /// Asks the connection to close with `code` for `cause`; true if this request won (the
    /// connection was not asked to close before).
    pub fn close_for(&self, code: u16, cause: CloseCause) -> bool {
        let request = u32::from(code) | (cause as u32) << 16;
        let won = self.close_request.compare_exchange(0, request, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if won {
            self.wake.notify_one();
        }
        won
    }

    pub fn close_requested(&self) -> Option<u16> {
        match self.close_request.load(Ordering::Acquire) & 0xffff {
            0 => None,
            code => Some(code as u16),
        }
    }

    /// Why the requested close was asked for.
    pub fn close_cause(&self) -> CloseCause {
        match self.close_request.load(Ordering::Acquire) >> 16 {
            1 => CloseCause::Rebalance,
            _ => CloseCause::Code,
        }
    }

    /// Whether a frame meant for this connection was ever refused.
    pub fn lost_frames(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    fn slow(&self) {
        if self.close_requested().is_none() {
            self.metrics.slow_consumer_disconnects.inc();
        }
        self.close(close::SLOW_CONSUMER);
    }
}

/// The sending side, held by rooms.
#[derive(Clone)]
pub struct Outbox {
    signal: Arc<ConnSignal>,
}

/// The receiving side, owned by the connection's task.
pub struct Inbox {
    signal: Arc<ConnSignal>,
}

/// What the connection's task should do next.
pub enum Wake {
    /// Frames were moved into the caller's buffer, oldest first.
    Frames,
    Close(u16),
}

pub fn outbox(max_frames: usize, max_bytes: usize, metrics: Arc<Metrics>) -> (Outbox, Inbox) {
    let signal = Arc::new(ConnSignal {
        queue: Mutex::new(Queue { frames: VecDeque::new(), bytes: 0 }),
        max_frames,
        max_bytes,
        close_request: AtomicU32::new(0),
        lost: AtomicBool::new(false),
        wake: Notify::new(),
        metrics,
    });
    (Outbox { signal: signal.clone() }, Inbox { signal })
}

impl Outbox {
    /// Queues a frame; false if it was not queued (the queue overflowed: now or before).
    /// A connection asked to close for another reason still takes frames: its task writes
    /// everything queued before the close, so what it reports as delivered was delivered.
    pub fn push(&self, frame: &Frame) -> bool {
        let signal = &self.signal;
        if signal.close_requested() == Some(close::SLOW_CONSUMER) {
            signal.lost.store(true, Ordering::Release);
            return false;
        }
        let mut queue = signal.queue();
        if queue.frames.len() >= signal.max_frames || queue.bytes + frame.len() > signal.max_bytes {
            drop(queue);
            signal.lost.store(true, Ordering::Release);
            signal.metrics.dropped_frames.inc();
            signal.slow();
            return false;
        }
        let was_empty = queue.frames.is_empty();
        queue.bytes += frame.len();
        queue.frames.push_back(frame.clone());
        drop(queue);
        // One wake per batch: the task takes everything queued when it runs.
        if was_empty {
            signal.wake.notify_one();
        }
        true
    }

    pub fn signal(&self) -> &Arc<ConnSignal> {
        &self.signal
    }
}

impl Inbox {
    /// Moves what is queued (up to `max` frames) into `out`, without waiting.
    pub fn take_into(&mut self, out: &mut Vec<Frame>, max: usize) {
        let mut queue = self.signal.queue();
        let n = queue.frames.len().min(max);
        let start = out.len();
        out.extend(queue.frames.drain(..n));
        queue.bytes -= out[start..].iter().map(|f| f.len()).sum::<usize>();
        if queue.frames.is_empty() && queue.frames.capacity() > IDLE_QUEUE_CAPACITY {
            // A burst left a large buffer behind; idle connections should not keep it.
            queue.frames = VecDeque::new();
        }
    }

    /// Waits until frames were moved into `out` or a close was requested; a close wins.
    pub async fn wait(&mut self, out: &mut Vec<Frame>, max: usize) -> Wake {
        loop {
            if let Some(code) = self.signal.close_requested() {
                return Wake::Close(code);
            }
            self.take_into(out, max);
            if !out.is_empty() {
                return Wake::Frames;
            }
            // A notify_one before this point leaves a permit, so no wake-up is lost.
            self.signal.wake.notified().await;
        }
    }

    pub fn signal(&self) -> &Arc<ConnSignal> {
        &self.signal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_marks_the_connection_slow() {
        let metrics = Arc::new(Metrics::new());
        let (out, mut inbox) = outbox(16, 10, metrics.clone());
        assert!(out.push(&Frame::from_static("12345")));
        assert!(out.push(&Frame::from_static("12345")));
        assert!(!out.push(&Frame::from_static("1")), "11 bytes exceed the 10-byte budget");
        assert_eq!(inbox.signal().close_requested(), Some(close::SLOW_CONSUMER));
        assert_eq!(metrics.slow_consumer_disconnects.get(), 1);
        assert!(!out.push(&Frame::from_static("1")), "nothing is queued once marked slow");
        assert!(inbox.signal().lost_frames());
        let mut taken = Vec::new();
        inbox.take_into(&mut taken, 10);
        assert_eq!(taken.len(), 2);
    }

    #[test]
    fn frame_count_is_bounded_too() {
        let (out, _inbox) = outbox(16, 1 << 20, Arc::new(Metrics::new()));
        let pushed = (0..20).filter(|_| out.push(&Frame::from_static("x"))).count();
        assert_eq!(pushed, 16);
        assert_eq!(out.signal().close_requested(), Some(close::SLOW_CONSUMER));
    }

    #[test]
    fn a_connection_asked_to_close_still_takes_frames() {
        let (out, mut inbox) = outbox(16, 1 << 20, Arc::new(Metrics::new()));
        out.signal().close(close::RECONNECT_ELSEWHERE);
        assert!(out.push(&Frame::from_static("a")), "queued: the task flushes before closing");
        let mut taken = Vec::new();
        inbox.take_into(&mut taken, 10);
        assert_eq!(taken.len(), 1);
        assert!(!out.signal().lost_frames());
    }

    #[tokio::test]
    async fn wait_returns_batches_then_close() {
        let (out, mut inbox) = outbox(16, 1 << 20, Arc::new(Metrics::new()));
        out.push(&Frame::from_static("a"));
        out.push(&Frame::from_static("b"));
        let mut buf = Vec::new();
        assert!(matches!(inbox.wait(&mut buf, 10).await, Wake::Frames));
        assert_eq!(buf.len(), 2);
        out.signal().close(close::RECONNECT_ELSEWHERE);
        assert!(matches!(inbox.wait(&mut buf, 10).await, Wake::Close(close::RECONNECT_ELSEWHERE)));
    }
}
