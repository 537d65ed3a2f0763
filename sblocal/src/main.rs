//! `sblocal`: a local, in-memory Azure Service Bus (AMQP broker, ATOM endpoint, Entra token
//! endpoint). See the crate README for the command line, files and routes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sblocal::config::{self, BrokerConfig};
use sblocal::entra::Entra;
use sblocal::identities::{Identities, DEFAULT_IDENTITY, TOKEN_EXCHANGE_AUDIENCE};
use sblocal::jwt::SigningKey;
use sblocal::server::{self, ServeOptions, ISSUER_KEY_FILE, ISSUER_URL_FILE};

#[derive(Parser)]
#[command(
    name = "sblocal",
    version,
    about = "A local, in-memory Azure Service Bus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker until SIGTERM/SIGINT; prints `ready` once every listener is bound and the
    /// files in DIR are written.
    Serve(ServeArgs),
    /// Print a service-account token signed by DIR's issuer key (what the kubelet projects).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory for ca.pem, emulator.env, workload.env, keys and the federated token file.
    #[arg(long)]
    dir: PathBuf,
    /// The emulator's Config.json (comments allowed); default: one queue `queue.1`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Plain AMQP listener (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:5672")]
    amqp: SocketAddr,
    /// AMQP over TLS listener.
    #[arg(long, default_value = "127.0.0.1:5671")]
    amqps: SocketAddr,
    /// Plain HTTP listener: /health, ATOM, /$admin/ routes.
    #[arg(long, default_value = "127.0.0.1:5300")]
    http: SocketAddr,
    /// HTTPS listener: token endpoint (authority host), OIDC issuer, ATOM.
    #[arg(long, default_value = "127.0.0.1:5443")]
    https: SocketAddr,
    /// Identities file (JSON); default: the four servicebusdemo identities.
    #[arg(long)]
    identities: Option<PathBuf>,
    /// The identity workload.env is written for.
    #[arg(long, default_value = DEFAULT_IDENTITY)]
    identity: String,
    /// The RootManageSharedAccessKey (any non-empty string); default: random on every start.
    #[arg(long, env = "SBLOCAL_SAS_KEY", hide_env_values = true)]
    sas_key: Option<String>,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    token_lifetime: u64,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The directory a `serve` run used (holds the issuer key and URL).
    #[arg(long)]
    dir: PathBuf,
    /// Subject, e.g. system:serviceaccount:default:servicebusdemo.
    #[arg(long)]
    sub: String,
    /// Audience.
    #[arg(long, default_value = TOKEN_EXCHANGE_AUDIENCE)]
    aud: String,
    /// Lifetime in seconds; a negative value mints an already-expired token.
    #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
    ttl: i64,
    /// Issuer (`iss`); default: the issuer URL the last `serve` wrote to DIR.
    #[arg(long)]
    iss: Option<String>,
}

/// Exit code for bad configuration (as clap uses for bad flags); 1 is a failure at run time.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rustls needs one process-wide provider; ring is the only one linked.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Serve(args) => match serve_options(args) {
            Ok(options) => run_serve(options),
            Err(error) => return fail(&error, EXIT_CONFIG),
        },
        Command::Token(args) => print_token(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error, 1),
    }
}

fn fail(error: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("sblocal: {error:#}");
    ExitCode::from(code)
}

/// Reads and checks every file and name the flags point at, before anything is bound.
fn serve_options(args: ServeArgs) -> anyhow::Result<ServeOptions> {
    let broker_config = match &args.config {
        Some(path) => config::load(path).with_context(|| format!("--config {}", path.display()))?,
        None => BrokerConfig::default(),
    };
    let identities = match &args.identities {
        Some(path) => {
            Identities::load(path).with_context(|| format!("--identities {}", path.display()))?
        }
        None => Identities::defaults(),
    };
    let options = ServeOptions {
        dir: args.dir,
        broker_config,
        amqp: args.amqp,
        amqps: args.amqps,
        http: args.http,
        https: args.https,
        identities,
        identity: args.identity,
        token_lifetime: Duration::from_secs(args.token_lifetime),
        sas_key: args.sas_key,
    };
    options.workload_identity().context("--identity")?;
    if let Some(key) = &options.sas_key {
        // It ends up in a connection string: `;` would split it, whitespace would be trimmed.
        if key.is_empty() || key.contains(';') || key.trim() != key {
            anyhow::bail!("--sas-key must be non-empty, without ';' or surrounding spaces");
        }
    }
    Ok(options)
}

fn run_serve(options: ServeOptions) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sblocal=info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        server::serve(options, shutdown).await
    })?;
    // Connection tasks may still hold sockets; don't wait for clients to notice.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Registers the stop signals now (so a signal arriving right after `ready` is not lost) and
/// returns a future that resolves on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

fn print_token(args: TokenArgs) -> anyhow::Result<()> {
    let key_path = args.dir.join(ISSUER_KEY_FILE);
    let pem = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "no issuer key at {} (run `sblocal serve --dir {}` first)",
            key_path.display(),
            args.dir.display()
        )
    })?;
    let key = SigningKey::from_pem(&pem)?;
    let issuer = match args.iss {
        Some(issuer) => issuer,
        None => {
            let path = args.dir.join(ISSUER_URL_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| format!("no issuer URL at {} (pass --iss)", path.display()))?
                .trim()
                .to_string()
        }
    };
    let token = Entra::service_account_token(&key, &issuer, &args.sub, &args.aud, args.ttl)?;
    println!("{token}");
    Ok(())
}
