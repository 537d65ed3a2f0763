//! servicebusdemo: one binary, three roles (producer, consumer, scaler).
//! `main` only wires config -> telemetry -> mode and maps errors to exit codes:
//! 0 success, 2 bad configuration (refused before any connection), 1 failure at run time.

mod auth;
mod config;
mod consumer;
mod producer;
mod scaler;
mod servicebus;
mod telemetry;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

use crate::auth::Credentials;
use crate::config::{Args, Config, ModeConfig};
use crate::telemetry::{Metrics, Readiness};

/// Bound on distinct queues the scaler tracks (trigger metadata decides which).
const SCALER_MAX_QUEUES: usize = 1000;

/// Set once the log subscriber is installed.
static TRACING_READY: AtomicBool = AtomicBool::new(false);

/// A failure, with the exit code it maps to.
#[derive(Debug)]
enum Failure {
    Config(String),
    Runtime(anyhow::Error),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Runtime(_) => ExitCode::from(1),
        }
    }
}

fn main() -> ExitCode {
    // reqwest (azure_identity's HTTP client) is built without a crypto provider; install ring
    // before anything can build a TLS configuration.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => return clap_exit(err),
    };
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            match &failure {
                Failure::Config(message) => eprintln!("error: {message}"),
                // Once logging is up the failure is a log line (JSON when asked for);
                // before that, plain stderr is all there is.
                Failure::Runtime(err) if TRACING_READY.load(Ordering::Acquire) => {
                    tracing::error!(error = telemetry::error_chain(err.as_ref()), "failed");
                }
                Failure::Runtime(err) => {
                    eprintln!("error: {}", telemetry::error_chain(err.as_ref()))
                }
            }
            failure.exit_code()
        }
    }
}

/// Help and version go to stdout with 0; a usage error is one line on stderr with 2.
fn clap_exit(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            ExitCode::SUCCESS
        }
        _ => {
            let rendered = err.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("error: {first} (see --help)");
            ExitCode::from(2)
        }
    }
}

async fn run(config: Config) -> Result<(), Failure> {
    let _telemetry = telemetry::init_tracing(&config.common.tracing).map_err(|err| match err {
        telemetry::TelemetryError::LogFilter { .. } => Failure::Config(err.to_string()),
        other => Failure::Runtime(other.into()),
    })?;
    TRACING_READY.store(true, Ordering::Release);
    let mode = config.mode();
    tracing::info!(
        mode = mode.as_str(),
        version = env!("CARGO_PKG_VERSION"),
        host = config.common.namespace.host.as_str(),
        port = config.common.namespace.port,
        transport = ?config.common.namespace.transport,
        "starting"
    );
    for note in &config.notes {
        tracing::info!("{note}");
    }
    let metrics = Arc::new(Metrics::new(mode.as_str()));
    let readiness = Readiness::new();
    let credentials = Credentials::new(&config.common.auth, Some(metrics.clone()))
        .map_err(|err| Failure::Config(err.to_string()))?;
    let credentials = Arc::new(credentials);
    let http = telemetry::serve_http(
        config.common.metrics_addr,
        metrics.clone(),
        readiness.clone(),
    )
    .await
    .map_err(|err| Failure::Runtime(err.into()))?;
    tracing::info!(metrics_addr = %http.local_addr(), "metrics address");

    let result = match &config.mode {
        ModeConfig::Producer(producer_config) => {
            let sent = tokio::select! {
                sent = producer::run(producer_config, &config.common, credentials, metrics, readiness) => sent,
                () = shutdown_signal() => {
                    return Err(Failure::Runtime(anyhow::anyhow!(
                        "stopped by a signal before every message was sent"
                    )));
                }
            };
            sent.map(drop).map_err(|err| Failure::Runtime(err.into()))
        }
        ModeConfig::Consumer(consumer_config) => consumer::run(
            consumer_config,
            &config.common,
            credentials,
            metrics,
            readiness,
            shutdown_signal(),
        )
        .await
        .map(drop)
        .map_err(|err| Failure::Runtime(err.into())),
        ModeConfig::Scaler(scaler_config) => {
            let options = scaler::ScalerOptions {
                grpc_addr: scaler_config.grpc_addr,
                namespace_host: config.common.namespace.host.clone(),
                management_endpoint: scaler_config.management_endpoint.clone(),
                cache_ttl: scaler_config.cache_ttl,
                max_staleness: scaler_config.max_staleness,
                poll_queues: scaler_config.queues.clone(),
                request_timeout: config.common.operation_timeout,
                max_queues: SCALER_MAX_QUEUES,
                tls: scaler_config.tls.as_ref().map(|tls| scaler::TlsFiles {
                    cert: tls.cert_file.clone(),
                    key: tls.key_file.clone(),
                    client_ca: tls.client_ca_file.clone(),
                }),
            };
            scaler::run(options, credentials, metrics, readiness, shutdown_signal())
                .await
                .map_err(|err| Failure::Runtime(err.into()))
        }
    };
    http.shutdown().await;
    result
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops us");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
