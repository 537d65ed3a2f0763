//! Write coalescing under fe2o3's transport.
//!
//! fe2o3 flushes the socket after every frame it sends. A consumer that completes a message
//! and asks for the next one therefore makes two socket writes (disposition, flow), a producer
//! one per transfer, and every write also wakes the broker once. [`CoalescingStream`] takes
//! what fe2o3 writes into a buffer that a writer task of its own empties: the frames sent
//! within one scheduler turn leave in one write (measured with PREFETCH=0: two writes per
//! message became one).
//!
//! A flush returns once the bytes are handed to that task, not once they are in the socket:
//! that is what lets the next frame join them. Nothing is lost by it: a shutdown (fe2o3's
//! close) waits until everything pending is written, a dropped stream still writes out what
//! it holds, and the first write error is returned by every later write, flush and shutdown.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};

/// Bytes held before a writer has to wait for the socket: a largest frame (256 KiB) and more.
const MAX_PENDING: usize = 512 * 1024;

/// A stream whose writes are gathered and written by a task of its own.
pub struct CoalescingStream<S> {
    read: ReadHalf<S>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Accepted from the writer side, not yet taken by the writer task.
    pending: Vec<u8>,
    /// The first write error (io::Error is not Clone: its kind and text).
    failed: Option<(io::ErrorKind, String)>,
    /// No more writes: write out what is pending, then shut the write side.
    closing: bool,
    /// The writer task is done with a requested close.
    closed: bool,
    /// The writer task, waiting for bytes.
    writer_waker: Option<Waker>,
    /// fe2o3's connection task, waiting for room or for the close to finish.
    stream_waker: Option<Waker>,
}

impl State {
    fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, text)| io::Error::new(*kind, text.clone()))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer task's side: swap the pending bytes into `batch`. Ready(true) once closing
    /// and nothing is left.
    fn poll_take(&self, batch: &mut Vec<u8>, cx: &mut Context<'_>) -> Poll<bool> {
        let waker = {
            let mut state = self.lock();
            if !state.pending.is_empty() {
                std::mem::swap(&mut state.pending, batch);
                state.stream_waker.take()
            } else if state.closing {
                return Poll::Ready(true);
            } else {
                state.writer_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        };
        // There is room again for a writer that was waiting.
        if let Some(waker) = waker {
            waker.wake();
        }
        Poll::Ready(false)
    }

    fn finish(&self, failure: Option<io::Error>) {
        let waker = {
            let mut state = self.lock();
            if let Some(err) = failure {
                state.failed.get_or_insert((err.kind(), err.to_string()));
            }
            state.closed = true;
            state.stream_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close(&self) {
        let waker = {
            let mut state = self.lock();
            state.closing = true;
            state.writer_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<S> std::fmt::Debug for CoalescingStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("CoalescingStream")
            .field("pending", &state.pending.len())
            .field("failed", &state.failed)
            .field("closing", &state.closing)
            .finish_non_exhaustive()
    }
}

impl<S> CoalescingStream<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    /// Wrap `stream`, spawning its writer task on the current runtime.
    pub fn new(stream: S) -> Self {
        let (read, write) = tokio::io::split(stream);
        let shared = Arc::new(Shared::default());
        tokio::spawn(write_out(write, Arc::clone(&shared)));
        Self { read, shared }
    }
}

/// The writer task: one write (and one flush, which a TLS stream needs) per batch.
async fn write_out<S: AsyncWrite>(mut socket: WriteHalf<S>, shared: Arc<Shared>) {
    let mut batch = Vec::new();
    loop {
        let closing = poll_fn(|cx| shared.poll_take(&mut batch, cx)).await;
        if closing {
            let shut = socket.shutdown().await;
            shared.finish(shut.err());
            return;
        }
        let written = async {
            socket.write_all(&batch).await?;
            socket.flush().await
        }
        .await;
        batch.clear();
        if let Err(err) = written {
            shared.finish(Some(err));
            return;
        }
    }
}

impl<S: AsyncRead> AsyncRead for CoalescingStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for CoalescingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (writer, accepted) = {
            let mut state = self.shared.lock();
            if let Some(err) = state.error() {
                return Poll::Ready(Err(err));
            }
            if state.closing {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let room = MAX_PENDING.saturating_sub(state.pending.len());
            if room == 0 {
                state.stream_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let accepted = buf.len().min(room);
            state.pending.extend_from_slice(&buf[..accepted]);
            (state.writer_waker.take(), accepted)
        };
        if let Some(writer) = writer {
            writer.wake();
        }
        Poll::Ready(Ok(accepted))
    }

    /// Ready once the bytes are with the writer task (see the module comment).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.shared.lock().error() {
            Some(err) => Poll::Ready(Err(err)),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Ready once everything pending is written and the write side is shut.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Poll::Ready(state.error().map_or(Ok(()), Err));
            }
            state.stream_waker = Some(cx.waker().clone());
        }
        self.shared.close();
        Poll::Pending
    }
}

impl<S> Drop for CoalescingStream<S> {
    /// The writer task still writes out what it holds, then shuts the write side and ends.
    fn drop(&mut self) {
        self.shared.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket that records every write call and can be told to fail.
    #[derive(Clone, Default)]
    struct Recorder {
        log: Arc<Mutex<Recorded>>,
    }

    #[derive(Default)]
    struct Recorded {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
        fail_writes: bool,
    }

    impl Recorder {
        fn log(&self) -> MutexGuard<'_, Recorded> {
            self.log.lock().unwrap()
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut log = self.log();
            if log.fail_writes {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer went away",
                )));
            }
            log.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.log().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.log().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Let the writer task run (single-threaded test runtime).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn frames_flushed_in_one_turn_leave_in_one_write() {
        let socket = Recorder::default();
        let mut stream = CoalescingStream::new(socket.clone());
        for frame in [&b"disposition"[..], b"flow", b"transfer"] {
            stream.write_all(frame).await.unwrap();
            stream.flush().await.unwrap();
        }
        settle().await;
        assert_eq!(
            socket.log().writes,
            vec![b"dispositionflowtransfer".to_vec()]
        );
        assert_eq!(socket.log().flushes, 1);

        // The next turn's frames form the next write.
        stream.write_all(b"more").await.unwrap();
        stream.flush().await.unwrap();
        settle().await;
        assert_eq!(socket.log().writes.len(), 2);
        assert_eq!(socket.log().writes[1], b"more");
    }

    #[tokio::test]
    async fn every_byte_arrives_in_order_past_the_pending_limit() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut stream = CoalescingStream::new(near);
        let sent: Vec<u8> = (0..3 * MAX_PENDING).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(10_000) {
                stream.write_all(chunk).await.unwrap();
                stream.flush().await.unwrap();
            }
            stream.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        far.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "bytes reordered or corrupted");
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_by_later_writes_flushes_and_shutdown() {
        let socket = Recorder::default();
        socket.log().fail_writes = true;
        let mut stream = CoalescingStream::new(socket.clone());
        stream.write_all(b"lost").await.unwrap();
        settle().await;
        let write = stream.write_all(b"next").await.unwrap_err();
        assert_eq!(write.kind(), io::ErrorKind::ConnectionReset);
        assert!(write.to_string().contains("peer went away"), "{write}");
        let flush = stream.flush().await.unwrap_err();
        assert_eq!(flush.kind(), io::ErrorKind::ConnectionReset);
        let shutdown = stream.shutdown().await.unwrap_err();
        assert_eq!(shutdown.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn shutdown_writes_everything_pending_first() {
        let socket = Recorder::default();
        let mut stream = CoalescingStream::new(socket.clone());
        stream.write_all(b"close frame").await.unwrap();
        stream.shutdown().await.unwrap();
        {
            let log = socket.log();
            assert_eq!(log.writes, vec![b"close frame".to_vec()]);
            assert!(log.shut);
        }
        let after = stream.write_all(b"late").await.unwrap_err();
        assert_eq!(after.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn a_dropped_stream_still_delivers_what_it_accepted() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut stream = CoalescingStream::new(near);
        stream.write_all(b"last words").await.unwrap();
        drop(stream);
        let mut received = Vec::new();
        far.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last words");
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut stream = CoalescingStream::new(near);
        far.write_all(b"open").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"open");
    }
}
