//! `kedasim`: run KEDA's ScaledJob loop against an external scaler, with local processes as
//! Jobs. Example (the tutorial's ScaledJob, driven by our scaler):
//!
//! ```text
//! kedasim --scaler-address 127.0.0.1:6000 --metadata queueName=orders \
//!         --metadata messageCount=10 --polling-interval 5s --until-inactive \
//!         --env OPERATION_MODE=consumer --env MESSAGE_COUNT=10 -- servicebusdemo
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;

use kedasim::driver::{connect, Driver, JobTemplate, ScaledJob, ScalerConnection, StopWhen};
use kedasim::strategy::ReplicaBounds;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Plays KEDA's ScaledJob controller against an external scaler"
)]
struct Args {
    /// The trigger's `scalerAddress` (`host:port`, or an http(s):// URL).
    #[arg(long, env = "KEDASIM_SCALER_ADDRESS")]
    scaler_address: String,
    /// ScaledJob name (`ScaledObjectRef.name`; also the prefix of job names).
    #[arg(long, default_value = "servicebusdemo-consumer")]
    name: String,
    /// Kubernetes namespace of the ScaledJob (`ScaledObjectRef.namespace`).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Trigger metadata entry, `key=value` (repeatable), e.g. `queueName=orders`.
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// `pollingInterval` (KEDA's default: 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    polling_interval: Duration,
    /// `minReplicaCount`.
    #[arg(long, default_value_t = 0)]
    min_replica_count: i64,
    /// `maxReplicaCount` (KEDA's default: 100).
    #[arg(long, default_value_t = 100)]
    max_replica_count: i64,
    /// Environment variable for every job, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Write each job's output to `<dir>/<job>.log`.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Stop once the trigger is inactive and no job is running.
    #[arg(long)]
    until_inactive: bool,
    /// Give up (exit 1) after this long, e.g. `10m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// CA certificate (PEM) for a TLS scaler (`caCert`).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (`tlsClientCert`).
    #[arg(long, requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (`tlsClientKey`).
    #[arg(long, requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// Server name to verify instead of the address's host.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// The job's program and arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]")]
    job: Vec<String>,
}

fn key_value(flag: &str, entry: &str) -> anyhow::Result<(String, String)> {
    match entry.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => bail!("--{flag} expects KEY=VALUE, got {entry:?}"),
    }
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn scaled_job(args: &Args) -> anyhow::Result<ScaledJob> {
    if args.max_replica_count < 1 || args.min_replica_count < 0 {
        bail!("--max-replica-count must be >= 1 and --min-replica-count >= 0");
    }
    if args.min_replica_count > args.max_replica_count {
        bail!("--min-replica-count cannot exceed --max-replica-count");
    }
    if args.polling_interval.is_zero() {
        bail!("--polling-interval must be greater than 0");
    }
    let trigger_metadata = args
        .metadata
        .iter()
        .map(|entry| key_value("metadata", entry))
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let env = args
        .env
        .iter()
        .map(|entry| key_value("env", entry))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (program, job_args) = args
        .job
        .split_first()
        .context("a job program is required after --")?;
    Ok(ScaledJob {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        trigger_metadata,
        polling_interval: args.polling_interval,
        bounds: ReplicaBounds {
            min_replica_count: args.min_replica_count,
            max_replica_count: args.max_replica_count,
        },
        job: JobTemplate {
            program: PathBuf::from(program),
            args: job_args.to_vec(),
            env,
            log_dir: args.log_dir.clone(),
        },
    })
}

fn connection(args: &Args) -> anyhow::Result<ScalerConnection> {
    let client_identity_pem = match (&args.tls_client_cert, &args.tls_client_key) {
        (Some(cert), Some(key)) => {
            Some((read(cert, "client certificate")?, read(key, "client key")?))
        }
        _ => None,
    };
    Ok(ScalerConnection {
        address: args.scaler_address.clone(),
        ca_cert_pem: args
            .ca_cert
            .as_ref()
            .map(|path| read(path, "CA certificate"))
            .transpose()?,
        client_identity_pem,
        tls_server_name: args.tls_server_name.clone(),
    })
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let scaled_job = scaled_job(&args)?;
    if let Some(dir) = &scaled_job.job.log_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --log-dir {}", dir.display()))?;
    }
    let client = connect(&connection(&args)?)?;
    let (name, namespace) = (scaled_job.name.clone(), scaled_job.namespace.clone());
    let driver = Driver::new(client, scaled_job);
    let started = tokio::time::Instant::now();
    let stop = StopWhen {
        inactive_and_idle: args.until_inactive,
        timeout: args.timeout,
    };
    let report = driver.run(stop, interrupted()).await?;
    println!();
    print!("{}", report.describe(&name, &namespace, started.elapsed()));
    Ok(report.success())
}

/// SIGINT or SIGTERM (a script stopping the demo).
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    eprintln!("kedasim: interrupted; stopping jobs");
}

fn main() -> ExitCode {
    let args = Args::parse();
    // tonic's TLS uses rustls; pick ring explicitly (the only provider compiled in).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kedasim: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("kedasim: {err:#}");
            ExitCode::from(2)
        }
    }
}
