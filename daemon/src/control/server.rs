//! The control-plane thread: a current-thread tokio runtime (plus its small blocking
//! pool) that serves the gRPC services on the API socket and `/metrics`, and stops
//! gracefully.
//!
//! Owns: [`ControlPlane`] (start, stop), [`Shared`] (what every service reads). A stop
//! marks the daemon stopping (new calls answer UNAVAILABLE), stops accepting connections,
//! lets in-flight calls finish (at most [`STOP_GRACE`]), stops `/metrics` and removes the
//! socket; the caller stops the reactors afterwards.
//!
//! Must never: run on a reactor thread; make a reactor wait on it.

use std::net::TcpListener as StdTcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
use crate::metrics::{self, http, DeviceSample, ReactorSample};
use crate::reactor::ReactorStats;

/// Longest a stop waits for in-flight calls (a stuck import stream must not keep the
/// daemon from stopping).
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// Threads the runtime may use for blocking work (discovery, claims).
pub const MAX_BLOCKING_THREADS: usize = 4;

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
            start_time: self.facts.start_time,
            reactors: self
                .reactors
                .iter()
                .map(|r| ReactorSample {
                    id: r.id,
                    core: r.core,
                    busy_ns: r.stats.busy_ns.load(Ordering::Relaxed),
                    sleep_ns: r.stats.sleep_ns.load(Ordering::Relaxed),
                    sleeps: r.stats.sleeps.load(Ordering::Relaxed),
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
        let render: http::Render = Arc::new(move || {
            let s = Arc::clone(&s);
            Box::pin(async move { metrics::render(&s.metrics_snapshot().await) })
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
    let server = tonic::transport::Server::builder()
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
        .serve_with_incoming_shutdown(UnixListenerStream::new(uds), shutdown);
    tracing::info!(socket = %socket.path().display(), "API serving");
    let _ = ready.send(Ok(()));
    // Pools are imported while the API serves: until then pool, volume and image calls
    // answer UNAVAILABLE.
    let import = tokio::spawn(Arc::clone(&shared.store).import_all());

    let grace = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        }
    };
    tokio::select! {
        result = server => {
            if let Err(error) = result {
                tracing::error!(%error, "the API server failed");
            }
        }
        () = grace => {
            tracing::warn!(grace_s = STOP_GRACE.as_secs(), "in-flight calls did not finish in time; stopping anyway");
        }
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    import.abort();
    // Exports stay for the next daemon; their in-flight requests finish before the pools
    // are flushed and stopped.
    shared.exports.detach_all().await;
    shared.store.stop().await;
    socket.remove();
    tracing::info!("control plane stopped");
}
