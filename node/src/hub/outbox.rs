//! A connection's bounded outbound queue, shared by every room it is in. Pushing never blocks
//! the publisher: when the queue is full (frames or bytes) the connection is marked slow and
//! its own task closes it, so one stuck client cannot hold memory or slow a room down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

use crate::metrics::Metrics;
use crate::protocol::close;
use crate::transport::Frame;

/// State shared between a connection's task and everyone who queues to it.
pub struct ConnSignal {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    close_code: AtomicU16,
    notify: Notify,
    metrics: Arc<Metrics>,
}

impl ConnSignal {
    /// Asks the connection to close with `code`; the first request wins.
    pub fn close(&self, code: u16) {
        if self.close_code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.notify.notify_one();
        }
    }

    pub fn close_requested(&self) -> Option<u16> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// Resolves once a close was requested.
    pub async fn closed(&self) -> u16 {
        loop {
            let notified = self.notify.notified();
            if let Some(code) = self.close_requested() {
                return code;
            }
            notified.await;
        }
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
    tx: mpsc::Sender<Frame>,
    signal: Arc<ConnSignal>,
}

/// The receiving side, owned by the connection's task.
pub struct Inbox {
    rx: mpsc::Receiver<Frame>,
    signal: Arc<ConnSignal>,
}

pub fn outbox(max_frames: usize, max_bytes: usize, metrics: Arc<Metrics>) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(max_frames);
    let signal = Arc::new(ConnSignal {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        close_code: AtomicU16::new(0),
        notify: Notify::new(),
        metrics,
    });
    (Outbox { tx, signal: signal.clone() }, Inbox { rx, signal })
}

impl Outbox {
    /// Queues a frame; false if it was not queued (connection closing, or now marked slow).
    pub fn push(&self, frame: &Frame) -> bool {
        let signal = &self.signal;
        if signal.close_requested().is_some() {
            return false;
        }
        let len = frame.len();
        if signal.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > signal.max_bytes {
            signal.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            signal.metrics.dropped_frames.inc();
            signal.slow();
            return false;
        }
        match self.tx.try_send(frame.clone()) {
            Ok(()) => {
                signal.metrics.frames_out.inc();
                true
            }
            Err(err) => {
                signal.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                if matches!(err, mpsc::error::TrySendError::Full(_)) {
                    signal.metrics.dropped_frames.inc();
                    signal.slow();
                }
                false
            }
        }
    }

    pub fn signal(&self) -> &Arc<ConnSignal> {
        &self.signal
    }
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.signal.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    pub fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.signal.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
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
        assert!(out.push(&Frame::from_static(b"12345")));
        assert!(out.push(&Frame::from_static(b"12345")));
        assert!(!out.push(&Frame::from_static(b"1")), "11 bytes exceed the 10-byte budget");
        assert_eq!(inbox.signal().close_requested(), Some(close::SLOW_CONSUMER));
        assert_eq!(metrics.slow_consumer_disconnects.get(), 1);
        assert!(!out.push(&Frame::from_static(b"1")), "nothing is queued once closing");
        assert_eq!(inbox.try_recv().as_deref(), Some(&b"12345"[..]));
    }

    #[test]
    fn frame_count_is_bounded_too() {
        let (out, _inbox) = outbox(16, 1 << 20, Arc::new(Metrics::new()));
        let pushed = (0..20).filter(|_| out.push(&Frame::from_static(b"x"))).count();
        assert_eq!(pushed, 16);
        assert_eq!(out.signal().close_requested(), Some(close::SLOW_CONSUMER));
    }
}
