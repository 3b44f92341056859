//! A client's TCP stream as the server sees it: every write bounded by
//! `server.write_timeout`, flushes reported to the connection's [`Unflushed`] slots, and the
//! connection's place among `server.max_connections` held for as long as the stream lives.

use crate::admission::{Slot, Unflushed};
use crate::metrics::Metrics;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// A client connection's stream. A write that makes no progress for `write_timeout` (the
/// client stopped reading and the socket buffer is full) fails with `TimedOut`, so hyper
/// drops the connection and everything its response held. A response waiting on the
/// upstream writes nothing and is not timed: only a stalled socket is.
pub(super) struct ClientStream {
    tcp: TcpStream,
    write_timeout: Duration,
    /// Armed when a write first finds the socket full; reset by any progress.
    stall: Pin<Box<Sleep>>,
    stalled: bool,
    unflushed: Arc<Unflushed>,
    metrics: Arc<Metrics>,
    /// This connection's place among `server.max_connections`.
    _place: Slot,
}

impl ClientStream {
    pub(super) fn new(
        tcp: TcpStream,
        write_timeout: Duration,
        unflushed: Arc<Unflushed>,
        metrics: Arc<Metrics>,
        place: Slot,
    ) -> Self {
        Self {
            tcp,
            write_timeout,
            stall: Box::pin(tokio::time::sleep(write_timeout)),
            stalled: false,
            unflushed,
            metrics,
            _place: place,
        }
    }

    /// Passes a write's result on, arming the stall timer when the socket is full and
    /// failing the write once the timer runs out.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        if !self.stalled {
            self.stalled = true;
            let deadline = Instant::now() + self.write_timeout;
            self.stall.as_mut().reset(deadline);
        }
        match self.stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.metrics.record_write_timeout();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no response bytes within server.write_timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.progress(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    /// hyper flushes the stream once its own buffer is written out: every response taken in
    /// full before now is on the socket, and the slots it held are free.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.unflushed.flushed();
        }
        this.progress(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tcp).poll_shutdown(cx);
        this.progress(cx, polled)
    }
}
