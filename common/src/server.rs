//! Serving an axum router so that no client can lock the others out: binding
//! `--web.listen-address`, a bounded set of connections, a deadline on every request head
//! (which is also the idle timeout of a kept-alive connection), graceful shutdown on SIGTERM and
//! Ctrl-C (in-flight requests finish), the raised open-file limit, and the small landing page
//! both binaries show at `/`.
//!
//! The connection cap sheds early and fairly: when a new connection arrives with every slot
//! taken, the connection that has been idle longest (no request being handled: a client that
//! connected and sent nothing, one dribbling a request head or body, a keep-alive between
//! scrapes) is closed to make room; only when every connection is busy with a request whose
//! body has arrived whole is the new one closed at once. Ten thousand idle sockets therefore cost their owner a reconnect loop and
//! cost a real scrape or webhook nothing. A full descriptor table (`EMFILE`) at accept is
//! answered the same way, by closing the longest-idle connection, never by a sleeping accept
//! loop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower::Service as _;

use crate::cli::ListenAddress;

/// How connections are bounded (`--web.max-connections`, `--web.read-header-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once; more evict the longest-idle one.
    pub max_connections: usize,
    /// Longest a client may take to send a request head, counted from the connection's
    /// start or from the end of the previous response: a kept-alive connection idle this long
    /// is closed too.
    pub header_timeout: Duration,
    /// After SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    /// These limits with the connection cap lowered, if needed, to leave `reserve` descriptors
    /// of `open_files` (the process' soft limit) for everything else: journal, sockets to
    /// Docker, NVML, probes.
    pub fn within_open_files(mut self, open_files: u64, reserve: u64) -> Self {
        let room = open_files.saturating_sub(reserve).max(16);
        self.max_connections = self
            .max_connections
            .min(usize::try_from(room).unwrap_or(usize::MAX));
        self
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns (before, after). The default
/// soft limit of 1,024 is what lets a thousand idle sockets starve a server of descriptors.
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    let Some(hard) = limit.maximum else {
        // Unlimited hard limit: ask for a large, sane number rather than "infinity".
        let raised = rustix::process::Rlimit {
            current: Some(before.max(1 << 20)),
            maximum: None,
        };
        setrlimit(Resource::Nofile, raised).map_err(io::Error::from)?;
        return Ok((before, before.max(1 << 20)));
    };
    if before >= hard {
        return Ok((before, before));
    }
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )
    .map_err(io::Error::from)?;
    Ok((before, hard))
}

/// Descriptors kept free of client connections for the journal, sockets to Docker and
/// Kubernetes, NVML, probes and magic packets.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the open-files limit (logged) and fits `limits` into what it allows.
pub fn prepare(limits: ConnectionLimits) -> ConnectionLimits {
    match raise_open_files_limit() {
        Ok((before, after)) => {
            if after > before {
                tracing::info!(
                    before,
                    after,
                    "raised the soft open-files limit to the hard limit"
                );
            }
            let fitted = limits.within_open_files(after, RESERVED_DESCRIPTORS);
            if fitted.max_connections < limits.max_connections {
                tracing::warn!(
                    open_files = after,
                    max_connections = fitted.max_connections,
                    "the open-files limit is low: fewer connections are served at once"
                );
            }
            fitted
        }
        Err(err) => {
            tracing::warn!(%err, "cannot raise the open-files limit");
            let current = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX);
            limits.within_open_files(current, RESERVED_DESCRIPTORS)
        }
    }
}

/// Binds the listen address. `:port` binds every interface: IPv6 (dual-stack) when the host has
/// it, IPv4 otherwise.
pub async fn bind(address: &ListenAddress) -> io::Result<TcpListener> {
    match &address.host {
        None => {
            let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, address.port));
            match TcpListener::bind(v6).await {
                Ok(listener) => Ok(listener),
                Err(_) => {
                    TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, address.port))).await
                }
            }
        }
        Some(host) => TcpListener::bind((host.as_str(), address.port)).await,
    }
}

/// Serves `router` until SIGTERM or Ctrl-C, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
) -> io::Result<()> {
    serve_until(listener, router, limits, shutdown_signal()).await
}

/// Serves `router` until `shutdown` resolves, then lets in-flight requests finish (for up to
/// `limits.shutdown_grace`).
pub async fn serve_until(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(
        address = %local,
        max_connections = limits.max_connections,
        header_timeout = ?limits.header_timeout,
        "listening"
    );
    let table = Arc::new(ConnectionTable::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some(slot) = table.admit(limits.max_connections) {
                    tokio::spawn(serve_connection(
                        stream,
                        peer,
                        router.clone(),
                        limits.header_timeout,
                        slot,
                        stop_rx.clone(),
                    ));
                } else {
                    // Every connection is busy with a request: this one is shed at once.
                    tracing::debug!(%peer, "every connection is busy: shed");
                    drop(stream);
                }
            }
            Err(err) if is_out_of_descriptors(&err) => {
                // Make room and try again after the evicted connection had time to close.
                let evicted = table.evict_longest_idle();
                tracing::warn!(%err, evicted, "accept: out of file descriptors");
                tokio::time::sleep(Duration::from_millis(if evicted { 5 } else { 50 })).await;
            }
            Err(err) => {
                // ECONNABORTED and friends: the client went away before we took it.
                tracing::debug!(%err, "accept failed");
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + limits.shutdown_grace;
    while table.len() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(unfinished = table.len(), "shut down");
    Ok(())
}

fn is_out_of_descriptors(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}

/// Milliseconds since the table was made: what `last_active` is counted in.
fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One connection as the table sees it.
#[derive(Debug)]
struct Connection {
    /// Requests being handled right now; a connection with none may be evicted.
    in_flight: AtomicUsize,
    /// When a request last began or ended (ms since the table's start).
    last_active: AtomicU64,
    /// Told to close the connection.
    evict: Notify,
}

/// The connections being served.
#[derive(Debug)]
struct ConnectionTable {
    start: Instant,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Connection>>>,
}

impl Default for ConnectionTable {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            next_id: AtomicU64::new(0),
            live: Mutex::default(),
        }
    }
}

/// A connection's place in the table; leaving it frees the place.
struct Slot {
    id: u64,
    connection: Arc<Connection>,
    table: Arc<ConnectionTable>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl ConnectionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// A place for a new connection, evicting the longest-idle one when all are taken; `None`
    /// when every connection is handling a request.
    fn admit(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let mut live = self.lock();
        if live.len() >= max {
            let victim = longest_idle(&live)?;
            // Its place is taken over now; the evicted task closes its socket on its own.
            if let Some(connection) = live.remove(&victim) {
                connection.evict.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(millis_since(self.start)),
            evict: Notify::new(),
        });
        live.insert(id, connection.clone());
        Some(Slot {
            id,
            connection,
            table: self.clone(),
        })
    }

    /// Closes the longest-idle connection; false when none is idle.
    fn evict_longest_idle(&self) -> bool {
        let mut live = self.lock();
        let Some(victim) = longest_idle(&live) else {
            return false;
        };
        if let Some(connection) = live.remove(&victim) {
            connection.evict.notify_one();
        }
        true
    }
}

fn longest_idle(live: &HashMap<u64, Arc<Connection>>) -> Option<u64> {
    live.iter()
        .filter(|(_, c)| c.in_flight.load(Ordering::Relaxed) == 0)
        .min_by_key(|(_, c)| c.last_active.load(Ordering::Relaxed))
        .map(|(id, _)| *id)
}

/// Marks a request in flight on its connection for as long as it lives.
struct InFlight {
    connection: Arc<Connection>,
    table: Arc<ConnectionTable>,
}

impl InFlight {
    fn begin(connection: &Arc<Connection>, table: &Arc<ConnectionTable>) -> Self {
        connection.in_flight.fetch_add(1, Ordering::Relaxed);
        connection
            .last_active
            .store(millis_since(table.start), Ordering::Relaxed);
        Self {
            connection: connection.clone(),
            table: table.clone(),
        }
    }
}

/// Where a request's [`InFlight`] mark lives once its body has arrived whole.
type Busy = Arc<Mutex<Option<InFlight>>>;

/// A request body that marks its request in flight only once it has arrived whole: a client
/// dribbling a body holds no protected place, and is evicted like an idle one.
struct WatchedBody {
    inner: Incoming,
    connection: Arc<Connection>,
    table: Arc<ConnectionTable>,
    busy: Option<Busy>,
}

impl WatchedBody {
    fn arrived(&mut self) {
        if let Some(busy) = self.busy.take() {
            *busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(InFlight::begin(&self.connection, &self.table));
        }
    }
}

impl hyper::body::Body for WatchedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                this.connection
                    .last_active
                    .store(millis_since(this.table.start), Ordering::Relaxed);
                if this.inner.is_end_stream() {
                    this.arrived();
                }
            }
            Poll::Ready(None) => this.arrived(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.connection
            .last_active
            .store(millis_since(self.table.start), Ordering::Relaxed);
        self.connection.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (connection, table) = (slot.connection.clone(), slot.table.clone());
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        // In flight (not to be evicted) once the whole request is here: at once without a
        // body, else when the body's last byte arrives.
        let busy: Busy = Arc::default();
        connection
            .last_active
            .store(millis_since(table.start), Ordering::Relaxed);
        let whole = request.body().is_end_stream();
        if whole {
            *busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(InFlight::begin(&connection, &table));
        }
        // What axum's `ConnectInfo` extractor reads: the client's address.
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let (connection, table) = (connection.clone(), table.clone());
        let watched = (!whole).then(|| busy.clone());
        let request = request.map(move |inner| {
            axum::body::Body::new(WatchedBody {
                inner,
                connection,
                table,
                busy: watched,
            })
        });
        let mut router = router.clone();
        async move {
            // Router is always ready; its errors are Infallible.
            let response = router.call(request).await;
            drop(busy);
            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopping = async {
        while !*stop.borrow_and_update() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%err, "connection ended with an error");
            }
        }
        () = slot.connection.evict.notified() => {
            tracing::debug!("idle connection evicted to make room");
        }
        () = stopping => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    drop(slot);
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}

/// The HTML page at `/`: the program's name and version and a link per endpoint.
pub fn landing_page(program: &str, links: &[(&str, &str)]) -> String {
    let items: String = links
        .iter()
        .map(|(href, what)| format!("<li><a href=\"{href}\">{href}</a> {what}</li>\n"))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{program}</title></head>\n\
         <body>\n<h1>{program}</h1>\n<p>version {}</p>\n<ul>\n{items}</ul>\n</body></html>\n",
        crate::LONG_VERSION
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use axum::routing::get;

    use super::*;

    fn limits(max: usize, header_timeout: Duration) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            header_timeout,
            shutdown_grace: Duration::from_secs(2),
        }
    }

    /// Starts a server on loopback and returns its address.
    fn start(limits: ConnectionLimits) -> (SocketAddr, tokio::runtime::Runtime) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "slow"
                }),
            )
            .route(
                "/upload",
                axum::routing::post(
                    |body: axum::body::Bytes| async move { body.len().to_string() },
                ),
            );
        runtime.spawn(serve_until(
            listener,
            router,
            limits,
            std::future::pending(),
        ));
        (address, runtime)
    }

    fn healthz(address: SocketAddr) -> io::Result<String> {
        let mut stream = std::net::TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    #[test]
    fn idle_connections_past_the_cap_make_room_for_a_request() {
        let (address, _runtime) = start(limits(8, Duration::from_secs(30)));
        let idle: Vec<_> = (0..40)
            .map(|_| std::net::TcpStream::connect(address).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let answer = healthz(address).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        drop(idle);
    }

    #[test]
    fn a_client_that_never_finishes_its_request_head_is_cut_off() {
        let (address, _runtime) = start(limits(8, Duration::from_millis(300)));
        let mut slow = std::net::TcpStream::connect(address).unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        // The server closes it (perhaps after a 408): read returns, it does not hang.
        let _ = slow.read_to_end(&mut buf);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn busy_connections_are_not_evicted_and_the_excess_is_shed() {
        let (address, _runtime) = start(limits(2, Duration::from_secs(30)));
        let busy: Vec<_> = (0..2)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(address).unwrap();
                s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // Both places hold a request in flight: the new connection is closed unserved.
        let shed = healthz(address).unwrap_or_default();
        assert!(shed.is_empty(), "{shed}");
        // The slow requests finish undisturbed.
        for mut s in busy {
            let mut answer = String::new();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.read_to_string(&mut answer).unwrap();
            assert!(answer.ends_with("slow"), "{answer}");
        }
        assert!(healthz(address).unwrap().ends_with("ok"));
    }

    #[test]
    fn clients_dribbling_a_body_hold_no_protected_place() {
        let (address, _runtime) = start(limits(4, Duration::from_secs(30)));
        let slow: Vec<_> = (0..8)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(address).unwrap();
                s.write_all(
                    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\nabc",
                )
                .unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let answer = healthz(address).unwrap();
        assert!(answer.ends_with("ok"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // A body that arrives whole is served.
        let mut whole = std::net::TcpStream::connect(address).unwrap();
        whole
            .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
            .unwrap();
        let mut answer = String::new();
        whole.read_to_string(&mut answer).unwrap();
        assert!(answer.ends_with('3'), "{answer}");
        drop(slow);
    }

    #[test]
    fn the_cap_leaves_descriptors_for_the_rest() {
        let limits = ConnectionLimits::default();
        assert_eq!(limits.within_open_files(1024, 256).max_connections, 512);
        assert_eq!(limits.within_open_files(600, 256).max_connections, 344);
        assert_eq!(limits.within_open_files(100, 256).max_connections, 16);
    }
}
