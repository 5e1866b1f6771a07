//! Closing the connection of an evicted client.
//!
//! When the layer gives up on a slow client (an [`Eviction`](crate::Eviction)
//! rule, or [`Overflow::Disconnect`](crate::Overflow::Disconnect)), its body
//! ends with [`Evicted`](crate::Evicted), and hyper closes the connection
//! when it polls the body next. A client that never reads again (its TCP
//! window is zero) is never polled again: hyper waits for the socket to take
//! what it has written, so the error never reaches it, and the connection,
//! with hyper's and the kernel's buffers, stays open for as long as the
//! client keeps it.
//!
//! A [`Connection`] is the handle that closes such a connection anyway.
//! Wrap each accepted IO in [`Closable`], and put its `Connection` into the
//! requests of that connection (a request extension); the layer closes it
//! when it evicts an HTTP/1 client, and a [`BufferedSink`](crate::BufferedSink)
//! given one with [`Builder::connection`](crate::sink::Builder::connection)
//! closes it when it evicts its client. Closing makes every pending and later
//! read and write of the IO fail, so hyper ends the connection and drops the
//! socket at once, however full its buffers are.
//!
//! HTTP/2 connections are left alone: they carry other streams, which keep
//! going; an evicted stream is reset when hyper polls it (bound what a stalled
//! stream holds with `http2::Builder::max_send_buf_size`, see the README).
//!
//! # With a hyper-util loop
//!
//! ```no_run
//! use hyper_util::rt::{TokioExecutor, TokioIo};
//! use hyper_util::server::conn::auto;
//! use hyper_util::service::TowerToHyperService;
//! use tower_backpressure::conn::Closable;
//! use tower_backpressure::PeerAddr;
//!
//! # async fn run(app: axum::Router) {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! loop {
//!     let (stream, peer) = listener.accept().await.unwrap();
//!     let stream = Closable::new(stream);
//!     let connection = stream.connection();
//!     let svc = tower::ServiceBuilder::new()
//!         .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
//!             req.extensions_mut().insert(connection.clone());
//!             req.extensions_mut().insert(PeerAddr(peer));
//!             req
//!         })
//!         .service(app.clone());
//!     tokio::spawn(
//!         auto::Builder::new(TokioExecutor::new())
//!             .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
//!             .into_owned(),
//!     );
//! }
//! # }
//! ```
//!
//! With `axum::serve` (feature `axum`), wrap the listener in
//! [`ClosableListener`] and serve with
//! `into_make_service_with_connect_info::<ConnectionInfo>()`: the layer
//! reads the peer address and the connection from it.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A handle that closes one accepted connection; from [`Closable`].
///
/// Cheap to clone. Put it into the requests of its connection as an
/// extension (or, with axum, use [`ConnectionInfo`]).
#[derive(Clone, Default)]
pub struct Connection {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    closed: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Connection {
    /// A handle not yet tied to an IO; [`Closable::with_connection`] ties it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes the connection: every pending and later read and write of its
    /// IO fails with [`io::ErrorKind::ConnectionAborted`], so the server
    /// drops it. Idempotent.
    pub fn close(&self) {
        if !self.inner.closed.swap(true, Ordering::AcqRel) {
            self.inner.read.wake();
            self.inner.write.wake();
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// A handle that does not keep the connection's state alive.
    pub(crate) fn downgrade(&self) -> WeakConnection {
        WeakConnection(Arc::downgrade(&self.inner))
    }
}

/// A [`Connection`] that does not keep its state alive: gone once the IO
/// and every handle are.
#[derive(Clone, Debug)]
pub(crate) struct WeakConnection(std::sync::Weak<Inner>);

impl WeakConnection {
    pub(crate) fn upgrade(&self) -> Option<Connection> {
        self.0.upgrade().map(|inner| Connection { inner })
    }

    /// The connection may still be open: a handle or its IO is left.
    pub(crate) fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// An accepted IO (a `TcpStream`, a TLS stream) that its [`Connection`] can
/// close.
#[pin_project]
#[derive(Debug)]
pub struct Closable<IO> {
    #[pin]
    io: IO,
    connection: Connection,
}

impl<IO> Closable<IO> {
    /// Wraps `io` with a new [`Connection`].
    pub fn new(io: IO) -> Self {
        Self::with_connection(io, Connection::new())
    }

    /// Wraps `io`, closed by `connection`.
    pub fn with_connection(io: IO, connection: Connection) -> Self {
        Self { io, connection }
    }

    /// The handle that closes this IO.
    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The wrapped IO, mutably.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Unwraps the IO.
    pub fn into_inner(self) -> IO {
        self.io
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed: its client was evicted",
    )
}

/// Fails once the connection is closed; otherwise registers `cx` so that a
/// close wakes the pending operation.
fn check(connection: &Connection, waker: &AtomicWaker, cx: &Context<'_>) -> io::Result<()> {
    if connection.is_closed() {
        return Err(aborted());
    }
    waker.register(cx.waker());
    if connection.is_closed() {
        return Err(aborted());
    }
    Ok(())
}

impl<IO: AsyncRead> AsyncRead for Closable<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        check(this.connection, &this.connection.inner.read, cx)?;
        this.io.poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite> AsyncWrite for Closable<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        check(this.connection, &this.connection.inner.write, cx)?;
        this.io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        check(this.connection, &this.connection.inner.write, cx)?;
        this.io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        check(this.connection, &this.connection.inner.write, cx)?;
        this.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        check(this.connection, &this.connection.inner.write, cx)?;
        this.io.poll_shutdown(cx)
    }
}

#[cfg(feature = "axum")]
pub use self::axum_support::{ClosableListener, ConnectionInfo};

#[cfg(feature = "axum")]
mod axum_support {
    use std::net::SocketAddr;

    use axum::extract::connect_info::Connected;
    use axum::serve::{IncomingStream, Listener};

    use super::{Closable, Connection};

    /// A listener for `axum::serve` whose connections the layer can close
    /// (feature `axum`).
    ///
    /// ```no_run
    /// use axum::Router;
    /// use tower_backpressure::conn::{ClosableListener, ConnectionInfo};
    ///
    /// # async fn run(app: Router) {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
    /// axum::serve(
    ///     ClosableListener::new(listener),
    ///     app.into_make_service_with_connect_info::<ConnectionInfo>(),
    /// )
    /// .await
    /// .unwrap();
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ClosableListener<L> {
        inner: L,
    }

    impl<L> ClosableListener<L> {
        /// Wraps `listener`.
        pub fn new(listener: L) -> Self {
            Self { inner: listener }
        }
    }

    impl<L: Listener> Listener for ClosableListener<L>
    where
        L::Io: Unpin,
    {
        type Io = Closable<L::Io>;
        type Addr = L::Addr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            let (io, addr) = self.inner.accept().await;
            (Closable::new(io), addr)
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.inner.local_addr()
        }
    }

    /// The connect info of a [`ClosableListener`]'s connection: the peer's
    /// address and the handle that closes the connection. The layer reads
    /// both from axum's `ConnectInfo<ConnectionInfo>`.
    #[derive(Debug, Clone)]
    pub struct ConnectionInfo {
        /// The peer's address.
        pub peer: SocketAddr,
        /// Closes the connection.
        pub connection: Connection,
    }

    impl<L> Connected<IncomingStream<'_, ClosableListener<L>>> for ConnectionInfo
    where
        L: Listener<Addr = SocketAddr>,
        L::Io: Unpin,
    {
        fn connect_info(stream: IncomingStream<'_, ClosableListener<L>>) -> Self {
            Self {
                peer: *stream.remote_addr(),
                connection: stream.io().connection(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn closing_fails_a_pending_read_and_every_later_write() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = Closable::new(a);
        let connection = a.connection();
        a.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // A read that waits for the peer is woken by the close.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let err = a.read(&mut buf).await.unwrap_err();
            (err.kind(), a)
        });
        tokio::task::yield_now().await;
        connection.close();
        let (kind, mut a) = reader.await.unwrap();
        assert_eq!(kind, io::ErrorKind::ConnectionAborted);
        assert!(a.write_all(b"more").await.is_err());
        assert!(connection.is_closed());
    }

    #[tokio::test]
    async fn closing_wakes_a_write_that_waits_for_a_full_peer() {
        let (a, _b) = tokio::io::duplex(8);
        let mut a = Closable::new(a);
        let connection = a.connection();
        // The peer reads nothing: the write waits once 8 bytes are queued.
        let writer = tokio::spawn(async move { a.write_all(&[0u8; 64]).await });
        tokio::task::yield_now().await;
        connection.close();
        let err = writer.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
