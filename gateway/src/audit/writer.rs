//! The audit log's writer: one thread that owns the file (or standard output), fed through a
//! bounded queue.
//!
//! Why a thread: a write to a stalled sink (a full disk, a stdout pipe nobody reads) blocks,
//! and done on a runtime thread under a lock it stalled every session of the proxy. Now only
//! the writer waits. Why bounded: an unbounded queue turns a stalled sink into unbounded
//! memory. When the queue is full, what happens is the operator's `audit.when_full` choice;
//! a record already owed (a session's end) is never dropped.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::telemetry::proxy::{AUDIT_QUEUE_DEPTH, AUDIT_WRITE_ERRORS_TOTAL};

pub(super) enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written and flushed.
    Flush(SyncSender<()>),
}

pub(super) struct Writer {
    tx: SyncSender<Msg>,
    /// Lines queued and not yet written.
    depth: Arc<AtomicUsize>,
    /// Lines that could not be written.
    errors: Arc<AtomicU64>,
    capacity: usize,
}

impl Writer {
    pub(super) fn spawn(sink: Box<dyn Write + Send>, capacity: usize) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (d, e) = (depth.clone(), errors.clone());
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_all(sink, rx, &d, &e))?;
        Ok(Self {
            tx,
            depth,
            errors,
            capacity,
        })
    }

    /// Queues a line, waiting for room when the queue is full: a queued line is never lost.
    pub(super) fn send(&self, line: Vec<u8>) {
        let d = self.depth.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(AUDIT_QUEUE_DEPTH).set(d as f64);
        if self.tx.send(Msg::Line(line)).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            // The writer thread is gone (it only ends when this sender is dropped, or by a
            // panic): say so loudly rather than pretend the event was written.
            metrics::counter!(AUDIT_WRITE_ERRORS_TOTAL).increment(1);
            tracing::error!("audit writer thread is gone; event not written");
        }
    }

    /// Whether at least half the queue is free (the bar for admitting a new session under
    /// `refuse-new-sessions`: the other half is room for the records already owed).
    pub(super) fn has_room(&self) -> bool {
        self.depth.load(Ordering::Relaxed) < self.capacity / 2
    }

    pub(super) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Waits until everything queued so far is written and flushed.
    pub(super) fn flush(&self) {
        let (done_tx, done_rx) = sync_channel(1);
        if self.tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }
}

fn write_all(
    mut sink: Box<dyn Write + Send>,
    rx: Receiver<Msg>,
    depth: &AtomicUsize,
    errors: &AtomicU64,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        // Batch what is already queued into one write: one syscall per burst, still whole
        // lines only (O_APPEND keeps each write contiguous).
        let mut flushes = Vec::new();
        let mut lines: u64 = 0;
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(l) => {
                    buf.extend_from_slice(&l);
                    lines += 1;
                }
                Msg::Flush(done) => flushes.push(done),
            }
            next = if buf.len() < 64 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !buf.is_empty() {
            if let Err(err) = sink.write_all(&buf).and_then(|()| sink.flush()) {
                metrics::counter!(AUDIT_WRITE_ERRORS_TOTAL).increment(lines);
                errors.fetch_add(lines, Ordering::Relaxed);
                tracing::error!(%err, events = lines, "failed to write audit events");
            }
            buf.clear();
        }
        let d = depth.fetch_sub(lines as usize, Ordering::Relaxed) - lines as usize;
        metrics::gauge!(AUDIT_QUEUE_DEPTH).set(d as f64);
        for done in flushes {
            let _ = done.send(());
        }
    }
}
