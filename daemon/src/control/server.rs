//! The control-plane thread: a current-thread tokio runtime (plus its small blocking
//! pool) that serves the gRPC services on the API socket and `/metrics`, and stops
//! gracefully.
//!
//! Owns: [`ControlPlane`] (start, stop), [`Shared`] (what every service reads), the count
//! of calls in flight ([`InFlight`]). A stop marks the daemon stopping: new calls that
//! would change anything answer UNAVAILABLE ("coreblkd is stopping; retry…") at once,
//! read-only ones answer with state STOPPING; in-flight calls finish (at most
//! [`STOP_GRACE`]); then the server and every connection still open are dropped, and the
//! socket is removed. The server keeps answering while it drains, rather than sending
//! GOAWAY and closing its listener (tonic's graceful shutdown): a client with an open
//! connection then reconnected to a closed listener and a create waited out its deadline
//! instead of hearing why, and an idle connection held the stop up until its client
//! answered the GOAWAY's PING, which one that is not polling never does. Then it stops
//! `/metrics`; the caller stops the reactors afterwards.
//!
//! Must never: run on a reactor thread; make a reactor wait on it.

use std::future::Future;
use std::net::TcpListener as StdTcpListener;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use coreblk_proto::v1 as pb;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

use super::claims::Claims;
use super::devices::DevicesService;
use super::error::Error;
use super::exports::{Exports, ExportsService};
use super::images::ImagesService;
use super::node::{NodeFacts, NodeService};
use super::pools::PoolsService;
use super::scrape::Scraper;
use super::snapshots::SnapshotsService;
use super::socket::ApiSocket;
use super::store::Store;
use super::volumes::VolumesService;
use crate::metrics::{self, http, DaemonStateSample, DeviceSample, ReactorSample};
use crate::reactor::ReactorStats;

/// Longest a stop waits for in-flight calls (a stuck import stream must not keep the
/// daemon from stopping).
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// Threads the runtime may use for blocking work (discovery, claims).
pub const MAX_BLOCKING_THREADS: usize = 4;

/// The API calls being served: each counts from the moment the server hands it to the
/// services until its response body has been sent or dropped (a streamed export or
/// import counts until its stream ends).
#[derive(Debug, Default)]
pub struct InFlight {
    calls: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    /// Calls in flight now.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Acquire)
    }

    fn enter(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(Arc::clone(self))
    }

    /// Returns once no call is in flight.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a last call ending in between still wakes us.
            idle.as_mut().enable();
            if self.calls() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One call in flight; dropping it ends the call.
#[derive(Debug)]
struct CallGuard(Arc<InFlight>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Tower layer counting every API call in [`InFlight`].
#[derive(Debug, Clone)]
struct CountCallsLayer(Arc<InFlight>);

impl<S> tower::Layer<S> for CountCallsLayer {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountCalls {
            inner,
            inflight: Arc::clone(&self.0),
        }
    }
}

/// See [`CountCallsLayer`].
#[derive(Debug, Clone)]
struct CountCalls<S> {
    inner: S,
    inflight: Arc<InFlight>,
}

type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for CountCalls<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>, Response = HttpResponse>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let guard = self.inflight.enter();
        let response = self.inner.call(req);
        Box::pin(async move {
            let r = response.await?;
            Ok(r.map(|body| {
                tonic::body::Body::new(CountedBody {
                    body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// A response body that ends its call when it is dropped.
struct CountedBody {
    body: tonic::body::Body,
    _guard: CallGuard,
}

impl http_body::Body for CountedBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// One reactor's identity and counters.
#[derive(Debug, Clone)]
pub struct ReactorHandle {
    /// Reactor id.
    pub id: usize,
    /// The core it runs on.
    pub core: usize,
    /// Its counters (atomics the reactor updates).
    pub stats: Arc<ReactorStats>,
}

/// What every service reads.
#[derive(Debug)]
pub struct Shared {
    /// The claimed devices.
    pub claims: Arc<Claims>,
    /// The pools.
    pub store: Arc<Store>,
    /// Facts gathered at start-up.
    pub facts: NodeFacts,
    /// The reactors.
    pub reactors: Vec<ReactorHandle>,
    /// The ublk exports.
    pub exports: Arc<Exports>,
    stopping: AtomicBool,
    scraper: Scraper,
}

impl Shared {
    /// Shared state for the services.
    #[must_use]
    pub fn new(
        claims: Arc<Claims>,
        store: Arc<Store>,
        facts: NodeFacts,
        reactors: Vec<ReactorHandle>,
        exports: Arc<Exports>,
    ) -> Self {
        Self {
            claims,
            store,
            facts,
            reactors,
            exports,
            stopping: AtomicBool::new(false),
            scraper: Scraper::default(),
        }
    }

    /// Whether a stop has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Starting (pools being imported), serving or stopping: what `GetNodeInfo` and
    /// `coreblk_daemon_state` report.
    pub fn daemon_state(&self) -> DaemonStateSample {
        if self.is_stopping() {
            DaemonStateSample::Stopping
        } else if !self.store.is_ready() {
            DaemonStateSample::Starting
        } else {
            DaemonStateSample::Serving
        }
    }

    /// UNAVAILABLE once a stop has begun.
    ///
    /// # Errors
    /// [`Error::ShuttingDown`] as a status.
    pub fn check_serving(&self) -> Result<(), tonic::Status> {
        if self.is_stopping() {
            return Err(Error::ShuttingDown.into());
        }
        Ok(())
    }

    /// What `/metrics` shows now (pool figures come from the owner reactors, object
    /// figures from [`Scraper`]'s cache).
    pub async fn metrics_snapshot(&self) -> metrics::Snapshot {
        let (pools, objects) = self.scraper.scrape(&self.store).await;
        metrics::Snapshot {
            version: self.facts.version,
            node_id: self.facts.node_id.clone(),
            start_time: self.facts.start_time,
            state: self.daemon_state(),
            reactors: self
                .reactors
                .iter()
                .map(|r| ReactorSample {
                    id: r.id,
                    core: r.core,
                    busy_ns: r.stats.busy_ns.load(Ordering::Relaxed),
                    sleep_ns: r.stats.sleep_ns.load(Ordering::Relaxed),
                    sleeps: r.stats.sleeps.load(Ordering::Relaxed),
                    early_sleeps: r.stats.early_sleeps.load(Ordering::Relaxed),
                    completions: r.stats.completions.load(Ordering::Relaxed),
                })
                .collect(),
            devices: self
                .claims
                .snapshot()
                .into_iter()
                .map(|c| DeviceSample {
                    device_uuid: c.device_uuid.to_string(),
                    pool_uuid: c.pool_uuid.to_string(),
                    path: c.path.display().to_string(),
                    size_bytes: c.size_bytes,
                    present: c.present,
                })
                .collect(),
            pools,
            objects,
            object_scans: self.scraper.scans(),
        }
    }
}

/// Everything the control plane serves with.
#[derive(Debug)]
pub struct ControlPlaneConfig {
    /// The bound API socket.
    pub socket: ApiSocket,
    /// The bound metrics listener, if metrics are on.
    pub metrics: Option<StdTcpListener>,
    /// Shared state.
    pub shared: Arc<Shared>,
}

/// The running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts the control-plane thread and returns once it serves.
    ///
    /// # Errors
    /// The runtime or thread cannot be created, or the listeners cannot be registered.
    pub fn start(cfg: ControlPlaneConfig) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name("coreblk-ctl-io")
            .build()
            .context("creating the control-plane runtime")?;
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("coreblk-control".to_owned())
            .spawn(move || {
                rt.block_on(run(cfg, stop_rx, ready_tx));
                // Blocking tasks (a claim waiting on blkid) get a moment to finish.
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .context("starting the control-plane thread")?;
        let ready = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the control-plane thread ended during start-up"))
            .and_then(|r| r);
        let mut plane = Self {
            stop,
            thread: Some(thread),
        };
        if let Err(e) = ready {
            plane.stop_and_join();
            return Err(e);
        }
        Ok(plane)
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the control-plane thread panicked");
            }
        }
    }

    /// Stops serving: no new calls, in-flight calls finish (within [`STOP_GRACE`]), the
    /// socket is removed. Returns once the thread has ended.
    pub fn stop(mut self) {
        self.stop_and_join();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

async fn run(
    cfg: ControlPlaneConfig,
    stop_rx: watch::Receiver<bool>,
    ready: std::sync::mpsc::SyncSender<anyhow::Result<()>>,
) {
    let ControlPlaneConfig {
        socket,
        metrics,
        shared,
    } = cfg;
    let setup = || -> anyhow::Result<_> {
        let uds = socket
            .try_clone_listener()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(l)
            })
            .with_context(|| format!("serving the API socket {}", socket.path().display()))?;
        let tcp = metrics
            .map(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .transpose()
            .context("serving the metrics endpoint")?;
        Ok((uds, tcp))
    };
    let (uds, tcp) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            socket.remove();
            return;
        }
    };
    let metrics_task = tcp.map(|listener| {
        let s = Arc::clone(&shared);
        let render: http::Render = Arc::new(move |page| {
            let s = Arc::clone(&s);
            Box::pin(async move {
                let snapshot = s.metrics_snapshot().await;
                match page {
                    http::Page::Metrics => metrics::render(&snapshot),
                    http::Page::Status => metrics::status::render(&snapshot),
                }
            })
        });
        tokio::spawn(http::serve(listener, render, stop_rx.clone()))
    });

    let shutdown = {
        let mut rx = stop_rx.clone();
        let shared = Arc::clone(&shared);
        async move {
            let _ = rx.wait_for(|s| *s).await;
            shared.stopping.store(true, Ordering::Release);
            tracing::info!("control plane stopping: no new calls; finishing in-flight ones");
        }
    };
    let inflight = Arc::new(InFlight::default());
    let server = tonic::transport::Server::builder()
        .layer(CountCallsLayer(Arc::clone(&inflight)))
        .add_service(pb::devices_server::DevicesServer::new(DevicesService::new(
            Arc::clone(&shared),
        )))
        .add_service(pb::node_server::NodeServer::new(NodeService::new(
            Arc::clone(&shared),
        )))
        .add_service(pb::pools_server::PoolsServer::new(PoolsService::new(
            Arc::clone(&shared),
        )))
        .add_service(pb::volumes_server::VolumesServer::new(VolumesService::new(
            Arc::clone(&shared),
        )))
        .add_service(pb::snapshots_server::SnapshotsServer::new(
            SnapshotsService::new(Arc::clone(&shared)),
        ))
        .add_service(
            pb::images_server::ImagesServer::new(ImagesService::new(Arc::clone(&shared)))
                .max_decoding_message_size(super::MAX_IMAGE_MESSAGE_BYTES)
                .max_encoding_message_size(super::MAX_IMAGE_MESSAGE_BYTES),
        )
        .add_service(pb::exports_server::ExportsServer::new(ExportsService::new(
            Arc::clone(&shared),
        )))
        .serve_with_incoming(UnixListenerStream::new(uds));
    tokio::spawn(shutdown);
    tracing::info!(socket = %socket.path().display(), "API serving");
    let _ = ready.send(Ok(()));
    // Pools are imported while the API serves: until then pool, volume and image calls
    // answer UNAVAILABLE.
    let import = tokio::spawn(Arc::clone(&shared.store).import_all());
    // Then the exports an earlier daemon left (or persistent ones after a reboot).
    let recover = {
        let s = Arc::clone(&shared);
        tokio::spawn(async move {
            s.store.wait_ready().await;
            s.exports.recover_all().await;
        })
    };

    let grace = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        }
    };
    // Once stopping and no call is in flight, the connections left are idle: the server
    // future is dropped (its connection tasks go with the runtime, closing them).
    let drained = {
        let mut rx = stop_rx.clone();
        let inflight = Arc::clone(&inflight);
        async move {
            let _ = rx.wait_for(|s| *s).await;
            inflight.drained().await;
        }
    };
    tokio::select! {
        result = server => {
            if let Err(error) = result {
                tracing::error!(%error, "the API server failed");
            }
        }
        () = drained => {
            tracing::info!("in-flight calls finished; closing idle connections");
        }
        () = grace => {
            tracing::warn!(grace_s = STOP_GRACE.as_secs(), "in-flight calls did not finish in time; stopping anyway");
        }
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    import.abort();
    recover.abort();
    // Exports stay for the next daemon; their in-flight requests finish before the pools
    // are flushed and stopped.
    shared.exports.detach_all().await;
    shared.store.stop().await;
    socket.remove();
    tracing::info!("control plane stopped");
}
