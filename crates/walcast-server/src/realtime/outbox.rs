//! A socket's bounded send queue: the hub, the broadcast topics and the socket itself push
//! frames; the socket task alone takes them off and writes them.
//!
//! ```text
//!   push (any task) ──lock──▶ Queue { frames: VecDeque, overflowed, closed, waker }
//!                                      │ wakes the socket task when it waits
//!   socket task ◀── ready() ───────────┘ ── pop() … until empty (buffer released)
//! ```
//!
//! Invariants:
//! - `push` never waits: a full queue (by frames or by bytes) refuses the frame, marks the
//!   outbox overflowed and wakes the socket task, which closes the connection (close 4008).
//!   A client that stops reading therefore costs at most the byte bound, whatever is sent.
//! - An idle socket holds no frame buffer: the queue's buffer is allocated on the first push
//!   and released whenever the socket task drains it. (A tokio bounded mpsc allocates a
//!   32-slot block and a cache-padded channel up front, about 1.8 KB per socket.)
//! - Readiness is level-triggered: `ready` completes while frames are queued or the queue has
//!   overflowed, so a wake-up can never be lost between a push and the task's next wait.
//! - Once the reader is dropped (the socket task ended), pushes are refused and the queued
//!   frames are freed.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use walcast_core::hub::{OutFrame, Outbox};

/// The socket's send queue, as the hub and the topics see it.
pub struct SocketOutbox {
    queue: Mutex<Queue>,
    capacity: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<OutFrame>,
    /// Bytes of the queued frames.
    bytes: usize,
    overflowed: bool,
    closed: bool,
    /// The socket task, while it waits in [`OutboxReader::ready`].
    waker: Option<Waker>,
}

/// The socket task's end of the queue. Dropping it closes the outbox.
pub struct OutboxReader {
    outbox: Arc<SocketOutbox>,
}

/// A queue of at most `capacity` frames (at least 1) and `max_bytes` bytes (a single frame
/// larger than that still fits into an empty queue, so one big message is never refused
/// only for its size).
pub fn bounded(capacity: usize, max_bytes: usize) -> (Arc<SocketOutbox>, OutboxReader) {
    let outbox = Arc::new(SocketOutbox {
        queue: Mutex::new(Queue::default()),
        capacity: capacity.max(1),
        max_bytes,
    });
    let reader = OutboxReader {
        outbox: outbox.clone(),
    };
    (outbox, reader)
}

impl SocketOutbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (every update is a
        // single push, pop or flag), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Outbox for SocketOutbox {
    fn push(&self, frame: OutFrame) -> bool {
        let mut q = self.lock();
        if q.closed || q.overflowed {
            return false;
        }
        let len = frame.len();
        let too_many = q.frames.len() >= self.capacity;
        let too_big = !q.frames.is_empty() && q.bytes.saturating_add(len) > self.max_bytes;
        let queued = if too_many || too_big {
            q.overflowed = true;
            false
        } else {
            q.bytes += len;
            q.frames.push_back(frame);
            true
        };
        let waker = q.waker.take();
        drop(q);
        // Woken outside the lock: the task may run at once on another thread and lock it.
        if let Some(w) = waker {
            w.wake();
        }
        queued
    }
}

impl SocketOutbox {
    /// Queue frames whatever the bounds (a resumed session's replay: the frames are already
    /// held in memory, and moving them here costs nothing more). Refused only once the
    /// socket is gone.
    pub fn push_unbounded(&self, frames: impl IntoIterator<Item = OutFrame>) -> bool {
        let mut q = self.lock();
        if q.closed {
            return false;
        }
        for frame in frames {
            q.bytes += frame.len();
            q.frames.push_back(frame);
        }
        let waker = q.waker.take();
        drop(q);
        if let Some(w) = waker {
            w.wake();
        }
        true
    }
}

impl OutboxReader {
    /// The shared end, for the hub and the topics.
    pub fn outbox(&self) -> &Arc<SocketOutbox> {
        &self.outbox
    }

    /// Completes when a frame is queued or the queue has overflowed.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            let mut q = self.outbox.lock();
            if q.overflowed || !q.frames.is_empty() {
                return Poll::Ready(());
            }
            match &q.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => q.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Did a push find the queue full? The connection must then be closed.
    pub fn overflowed(&self) -> bool {
        self.outbox.lock().overflowed
    }

    /// The oldest queued frame. Taking the last one releases the queue's buffer, so an idle
    /// socket keeps none.
    pub fn pop(&self) -> Option<OutFrame> {
        let mut q = self.outbox.lock();
        let frame = q.frames.pop_front();
        if let Some(f) = &frame {
            q.bytes = q.bytes.saturating_sub(f.len());
        }
        if q.frames.is_empty() && q.frames.capacity() > 0 {
            q.frames = VecDeque::new();
        }
        frame
    }
}

impl Drop for OutboxReader {
    fn drop(&mut self) {
        let mut q = self.outbox.lock();
        q.closed = true;
        q.waker = None;
        q.frames = VecDeque::new();
        q.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Context;

    fn frame(s: &str) -> OutFrame {
        OutFrame::text(s.to_string())
    }

    fn text(f: Option<OutFrame>) -> Option<String> {
        f.map(|f| match f {
            OutFrame::Text(b) | OutFrame::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
        })
    }

    #[test]
    fn frames_come_out_in_push_order() {
        let (outbox, reader) = bounded(4, usize::MAX);
        assert!(outbox.push(frame("a")));
        assert!(outbox.push(frame("b")));
        assert_eq!(text(reader.pop()).as_deref(), Some("a"));
        assert!(outbox.push(frame("c")));
        assert_eq!(text(reader.pop()).as_deref(), Some("b"));
        assert_eq!(text(reader.pop()).as_deref(), Some("c"));
        assert_eq!(reader.pop(), None);
        assert!(!reader.overflowed());
    }

    #[test]
    fn a_full_queue_refuses_and_marks_overflow() {
        let (outbox, reader) = bounded(2, usize::MAX);
        assert!(outbox.push(frame("a")));
        assert!(outbox.push(frame("b")));
        assert!(!outbox.push(frame("c")));
        assert!(reader.overflowed());
        // Once overflowed the socket is being closed: nothing more is queued.
        assert_eq!(text(reader.pop()).as_deref(), Some("a"));
        assert!(!outbox.push(frame("d")));
    }

    #[test]
    fn pushes_after_the_reader_is_gone_are_refused() {
        let (outbox, reader) = bounded(2, usize::MAX);
        assert!(outbox.push(frame("a")));
        drop(reader);
        assert!(!outbox.push(frame("b")));
        assert!(outbox.lock().frames.capacity() == 0);
    }

    #[test]
    fn a_drained_queue_keeps_no_buffer() {
        let (outbox, reader) = bounded(16, usize::MAX);
        assert_eq!(outbox.lock().frames.capacity(), 0);
        outbox.push(frame("a"));
        outbox.push(frame("b"));
        reader.pop();
        assert!(outbox.lock().frames.capacity() > 0);
        reader.pop();
        assert_eq!(outbox.lock().frames.capacity(), 0);
    }

    #[test]
    fn ready_is_level_triggered_and_woken_by_push() {
        let (outbox, reader) = bounded(2, usize::MAX);
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let waker = Waker::from(Arc::new(Count(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = Box::pin(reader.ready());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        outbox.push(frame("a"));
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        // Still ready while the frame is queued: no wake-up is consumed.
        let mut again = Box::pin(reader.ready());
        assert!(again.as_mut().poll(&mut cx).is_ready());
        reader.pop();
        let mut idle = Box::pin(reader.ready());
        assert!(idle.as_mut().poll(&mut cx).is_pending());
    }

    #[test]
    fn the_byte_bound_overflows_but_admits_one_big_frame() {
        let (outbox, reader) = bounded(100, 10);
        assert!(
            outbox.push(frame(&"x".repeat(50))),
            "alone, a big frame fits"
        );
        assert!(!outbox.push(frame("y")), "past the byte bound");
        assert!(reader.overflowed());
        let (outbox, reader) = bounded(100, 10);
        assert!(outbox.push(frame("12345")));
        assert!(outbox.push(frame("12345")));
        reader.pop();
        assert!(outbox.push(frame("abcde")), "popping frees bytes");
        assert!(!outbox.push(frame("z")));
    }

    /// What an idle socket's queue costs: the shared allocation only, no frame buffer.
    #[test]
    fn an_idle_outbox_is_small() {
        let size = std::mem::size_of::<SocketOutbox>();
        assert!(size <= 96, "SocketOutbox is {size} bytes");
    }
}
