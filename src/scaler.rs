//! `OPERATION_MODE=scaler`: a KEDA external scaler for Service Bus queues.
//!
//! KEDA calls this over gRPC (`externalscaler.proto`) instead of polling Azure itself, so the
//! KEDA operator needs no Azure identity. Counts come from the namespace's management (ATOM)
//! endpoint through a per-queue cache with single-flight refresh (see [`cache`]); a background
//! poll keeps the `servicebusdemo_queue_*` gauges current for Prometheus-driven scaling.

pub mod cache;
pub mod metadata;
mod service;

#[cfg(test)]
mod tests;

/// Generated from `proto/externalscaler.proto`.
pub mod proto {
    tonic::include_proto!("externalscaler");
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use url::Url;

use crate::servicebus::admin::{AdminClient, AdminError, Authorizer};
use crate::telemetry::{Metrics, Readiness};
use cache::{CacheSettings, CountCache, QueueCountSource};
use proto::external_scaler_server::ExternalScalerServer;
use service::ScalerService;

/// Everything the scaler needs, already validated by the config layer.
#[derive(Clone, Debug)]
pub struct ScalerOptions {
    /// gRPC listen address (`SCALER_GRPC_ADDR`); port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// The namespace host name (`AZURE_SERVICEBUS_HOSTNAME`), which trigger metadata must name.
    pub namespace_host: String,
    /// Base URL of the management endpoint (`AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT`).
    pub management_endpoint: Url,
    /// How long a count is reused; also the background poll period.
    pub cache_ttl: Duration,
    /// On transient failures, serve a last good count up to this old.
    pub max_staleness: Duration,
    /// Queues polled in the background for the `/metrics` gauges.
    pub poll_queues: Vec<String>,
    /// Timeout of one management request.
    pub request_timeout: Duration,
    /// Bound on distinct queues the scaler tracks.
    pub max_queues: usize,
    /// gRPC over TLS (and mutual TLS with a client CA) when set.
    pub tls: Option<TlsFiles>,
}

/// PEM files for gRPC TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid gRPC TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("cannot bind the gRPC address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("gRPC server task ended unexpectedly: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// A scaler serving gRPC in the background.
#[derive(Debug)]
pub struct RunningScaler {
    local_addr: SocketAddr,
    stopping: watch::Sender<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    poller: JoinHandle<()>,
}

impl RunningScaler {
    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Wait until the server stops on its own (an error) without shutting it down.
    async fn wait(&mut self) -> Result<(), ScalerError> {
        (&mut self.server)
            .await
            .map_err(ScalerError::Task)?
            .map_err(ScalerError::Serve)
    }

    /// Stop accepting calls, end open streams, finish in-flight calls, stop polling.
    /// Calls still running after [`SHUTDOWN_GRACE`] are cut off.
    pub async fn shutdown(mut self) -> Result<(), ScalerError> {
        self.begin_shutdown();
        match tokio::time::timeout(SHUTDOWN_GRACE, self.wait()).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "gRPC calls still running; stopping anyway");
                self.server.abort();
                Ok(())
            }
        }
    }

    fn begin_shutdown(&mut self) {
        self.poller.abort();
        let _ = self.stopping.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for RunningScaler {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// How long a graceful shutdown waits for in-flight gRPC calls.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Run the scaler against the management endpoint until `shutdown` resolves.
/// `/readyz` reports ready while the gRPC server is accepting calls.
pub async fn run(
    options: ScalerOptions,
    authorizer: Arc<dyn Authorizer>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ScalerError> {
    let admin = AdminClient::new(
        options.management_endpoint.clone(),
        options.namespace_host.clone(),
        authorizer,
        Some(metrics.clone()),
        options.request_timeout,
    )?;
    tracing::info!(
        management_endpoint = %admin.base(),
        namespace = options.namespace_host.as_str(),
        cache_ttl = ?options.cache_ttl,
        queues = ?options.poll_queues,
        "starting the KEDA external scaler"
    );
    let mut scaler = start(&options, Arc::new(admin), metrics).await?;
    readiness.set_ready(true);
    tracing::info!(grpc_addr = %scaler.local_addr(), "scaler ready");
    let result = tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down the scaler");
            readiness.set_ready(false);
            scaler.shutdown().await
        }
        served = scaler.wait() => served,
    };
    readiness.set_ready(false);
    result
}

/// Bind and serve the gRPC scaler (and gRPC health) with counts from `source`.
pub async fn start(
    options: &ScalerOptions,
    source: Arc<dyn QueueCountSource>,
    metrics: Arc<Metrics>,
) -> Result<RunningScaler, ScalerError> {
    let cache = Arc::new(CountCache::new(
        source,
        CacheSettings {
            ttl: options.cache_ttl,
            max_staleness: options.max_staleness,
            max_queues: options.max_queues,
        },
        metrics,
    ));
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let scaler_service = ScalerService::new(
        Arc::clone(&cache),
        options.namespace_host.clone(),
        options.cache_ttl,
        stopping_rx,
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ExternalScalerServer<ScalerService>>()
        .await;

    let mut builder = Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(server_tls_config(tls)?)
            .map_err(ScalerError::Tls)?;
    }

    let listener = TcpListener::bind(options.grpc_addr)
        .await
        .map_err(|source| ScalerError::Bind {
            addr: options.grpc_addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ScalerError::Bind {
        addr: options.grpc_addr,
        source,
    })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let router = builder
        .add_service(health_service)
        .add_service(ExternalScalerServer::new(scaler_service));
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_rx.await;
    }));
    let poller = cache.spawn_poller(options.poll_queues.clone());
    tracing::info!(
        addr = %local_addr,
        tls = options.tls.is_some(),
        mutual_tls = options.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some()),
        "serving externalscaler.ExternalScaler and grpc.health.v1.Health"
    );
    Ok(RunningScaler {
        local_addr,
        stopping: stopping_tx,
        shutdown: Some(shutdown_tx),
        server,
        poller,
    })
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ScalerError> {
    std::fs::read(path).map_err(|source| ScalerError::TlsFile {
        path: path.to_owned(),
        source,
    })
}

fn server_tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, ScalerError> {
    let identity = Identity::from_pem(read_pem(&files.cert)?, read_pem(&files.key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(client_ca) = &files.client_ca {
        // With a client CA, clients without a certificate it signed are refused.
        config = config.client_ca_root(Certificate::from_pem(read_pem(client_ca)?));
    }
    Ok(config)
}
