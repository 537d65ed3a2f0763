//! Where log lines go: stderr, written when a busy thread is about to wait.
//!
//! The consumer logs every message it receives. Written at once, that write sits inside the
//! message's round trip: at PREFETCH=0 the consumer spent a fifth of its time per message on
//! it (measured by running with and without the line). A thread that opts in with
//! [`buffer_this_thread`] gathers its lines and writes them in one go when it is about to
//! park (the consumer's runtime calls [`flush_this_thread`] from `on_thread_park`), i.e. once
//! the message's settlement is on the wire. Lines of every other thread go straight to stderr.
//!
//! Nothing is held for long: a thread parks whenever it waits for the network or a timer, a
//! full buffer is written at once, and what is left is written when the thread ends.

use std::cell::RefCell;
use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Buffered bytes at which a thread writes its lines without waiting to park.
const MAX_BUFFERED: usize = 64 * 1024;

/// This thread's buffered lines (`None`: the thread writes straight to stderr).
struct ThreadBuffer(RefCell<Option<Vec<u8>>>);

impl ThreadBuffer {
    fn flush(&self) {
        if let Ok(mut buffer) = self.0.try_borrow_mut() {
            if let Some(bytes) = buffer.as_mut().filter(|bytes| !bytes.is_empty()) {
                emit(bytes);
                bytes.clear();
            }
        }
    }
}

/// Write lines out: to stderr (in unit tests, to this thread's capture).
fn emit(bytes: &[u8]) {
    #[cfg(not(test))]
    {
        // Logging has nowhere to report its own failure.
        let _ = io::stderr().write_all(bytes);
    }
    #[cfg(test)]
    tests::CAPTURED.with(|captured| captured.borrow_mut().extend_from_slice(bytes));
}

impl Drop for ThreadBuffer {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static BUFFER: ThreadBuffer = const { ThreadBuffer(RefCell::new(None)) };
}

/// Gather this thread's log lines until it parks (see the module comment).
pub fn buffer_this_thread() {
    BUFFER.with(|buffer| {
        buffer
            .0
            .borrow_mut()
            .get_or_insert_with(|| Vec::with_capacity(16 * 1024));
    });
}

/// Write the lines this thread gathered. Cheap when there are none.
pub fn flush_this_thread() {
    let _ = BUFFER.try_with(ThreadBuffer::flush);
}

/// The `MakeWriter` for the log layers: stderr, through the thread's buffer if it has one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One log line's writes.
pub struct Line;

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let buffered = BUFFER
            .try_with(|buffer| {
                let Ok(mut guard) = buffer.0.try_borrow_mut() else {
                    return false;
                };
                let Some(pending) = guard.as_mut() else {
                    return false;
                };
                pending.extend_from_slice(bytes);
                if pending.len() >= MAX_BUFFERED {
                    emit(pending);
                    pending.clear();
                }
                true
            })
            .unwrap_or(false);
        if !buffered {
            emit(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        pub(super) static CAPTURED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    fn captured() -> String {
        CAPTURED.with(|captured| String::from_utf8(captured.borrow().clone()).unwrap())
    }

    #[test]
    fn lines_go_out_at_once_unless_the_thread_opted_in() {
        std::thread::spawn(|| {
            Line.write_all(b"straight through\n").unwrap();
            assert_eq!(captured(), "straight through\n");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_opted_in_thread_writes_its_lines_in_order_when_it_flushes() {
        std::thread::spawn(|| {
            buffer_this_thread();
            Line.write_all(b"first\n").unwrap();
            Line.write_all(b"second\n").unwrap();
            assert_eq!(captured(), "", "held until the thread parks");
            flush_this_thread();
            assert_eq!(captured(), "first\nsecond\n");
            Line.write_all(b"third\n").unwrap();
            flush_this_thread();
            flush_this_thread();
            assert_eq!(captured(), "first\nsecond\nthird\n");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting() {
        std::thread::spawn(|| {
            buffer_this_thread();
            let line = [b'x'; 1000];
            let lines_below_the_limit = MAX_BUFFERED / line.len();
            for _ in 0..lines_below_the_limit {
                Line.write_all(&line).unwrap();
            }
            assert_eq!(captured(), "");
            Line.write_all(&line).unwrap();
            assert_eq!(captured().len(), (lines_below_the_limit + 1) * line.len());
        })
        .join()
        .unwrap();
    }
}
