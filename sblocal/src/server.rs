//! `sblocal serve`: binds the listeners, wires broker, validators, token endpoint and HTTP, writes
//! the files clients need (`ca.pem`, `emulator.env`, `workload.env`, a federated token file) and
//! runs until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use base64::Engine;
use ring::rand::SecureRandom;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::atom::AtomState;
use crate::auth::{JwtValidator, Rights, SasRule, SasValidator, Validator, ROOT_KEY_NAME};
use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::entra::{Entra, EntraSettings};
use crate::faults::{Counters, Faults};
use crate::http::{self, AdminState};
use crate::identities::{Identities, IdentitiesError, Identity, TOKEN_EXCHANGE_AUDIENCE};
use crate::jwt::SigningKey;
use crate::tls::Pki;

/// Files `serve` writes into `--dir`.
pub const CA_FILE: &str = "ca.pem";
pub const EMULATOR_ENV_FILE: &str = "emulator.env";
pub const WORKLOAD_ENV_FILE: &str = "workload.env";
pub const ISSUER_KEY_FILE: &str = "issuer-key.pem";
pub const TOKEN_KEY_FILE: &str = "token-signing-key.pem";
pub const ISSUER_URL_FILE: &str = "oidc-issuer";
pub const FEDERATED_TOKEN_FILE: &str = "azure-identity-token";
pub const IDENTITIES_FILE: &str = "identities.json";

/// Lifetime of the federated token file `serve` mints, and how often it is rewritten (the
/// kubelet refreshes projected tokens at 80% of their life).
const FEDERATED_TOKEN_TTL: Duration = Duration::from_secs(3600);
const FEDERATED_TOKEN_REFRESH: Duration = Duration::from_secs(2880);

/// Validated settings for [`serve`]; files named on the command line are already parsed.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub dir: PathBuf,
    pub broker_config: BrokerConfig,
    pub amqp: SocketAddr,
    pub amqps: SocketAddr,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub identities: Identities,
    /// Must name one of `identities` (checked by [`ServeOptions::workload_identity`]).
    pub identity: String,
    pub token_lifetime: Duration,
}

impl ServeOptions {
    /// The identity `workload.env` is written for.
    pub fn workload_identity(&self) -> Result<&Identity, IdentitiesError> {
        self.identities.by_name(&self.identity)
    }
}

struct Listeners {
    amqp: TcpListener,
    amqps: TcpListener,
    http: TcpListener,
    https: TcpListener,
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    amqp: u16,
    amqps: u16,
    http: u16,
    https: u16,
}

async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {flag} {addr}"))
}

/// Runs the broker until `shutdown` resolves.
pub async fn serve(
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let workload_identity = options.workload_identity().context("--identity")?.clone();
    let broker_config = options.broker_config;
    for note in &broker_config.not_served {
        tracing::warn!("not served: {note}");
    }
    let identities = Arc::new(options.identities);

    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("cannot create --dir {}", options.dir.display()))?;
    let dir = options
        .dir
        .canonicalize()
        .with_context(|| format!("--dir {}", options.dir.display()))?;
    let pki = Pki::generate()?;
    let issuer_key = SigningKey::load_or_create(&dir.join(ISSUER_KEY_FILE))?;
    let token_key = SigningKey::load_or_create(&dir.join(TOKEN_KEY_FILE))?;

    let listeners = Listeners {
        amqp: bind("--amqp", options.amqp).await?,
        amqps: bind("--amqps", options.amqps).await?,
        http: bind("--http", options.http).await?,
        https: bind("--https", options.https).await?,
    };
    let ports = Ports {
        amqp: listeners.amqp.local_addr()?.port(),
        amqps: listeners.amqps.local_addr()?.port(),
        http: listeners.http.local_addr()?.port(),
        https: listeners.https.local_addr()?.port(),
    };
    let https_base = format!("https://localhost:{}", ports.https);
    let oidc_issuer = format!("{https_base}/oidc");

    let faults = Arc::new(Faults::default());
    let counters = Arc::new(Counters::default());
    let sas_key = random_key()?;
    let entra = Arc::new(Entra::new(EntraSettings {
        authority: https_base.clone(),
        oidc_issuer: oidc_issuer.clone(),
        issuer_key: issuer_key.verifying_key(),
        token_key,
        identities: identities.clone(),
        default_lifetime: options.token_lifetime,
        faults: faults.clone(),
        counters: counters.clone(),
    }));
    let validator = Arc::new(Validator::new(
        SasValidator::new(vec![SasRule {
            key_name: ROOT_KEY_NAME.to_string(),
            key: sas_key.clone(),
            rights: Rights::ALL,
        }]),
        Some(JwtValidator::new(
            vec![entra.token_verifying_key()],
            entra.access_token_issuer(),
            identities.clone(),
        )),
    ));
    let queue_names: Vec<String> = broker_config
        .queues
        .iter()
        .map(|q| q.name.clone())
        .collect();
    let broker = Broker::new(broker_config.queues, validator.clone());

    let atom = Arc::new(AtomState {
        broker: broker.clone(),
        validator,
        counters: counters.clone(),
        started_at: SystemTime::now(),
    });
    let common = http::common_routes(atom, entra.clone());
    let admin = http::admin_routes(Arc::new(AdminState {
        broker: broker.clone(),
        faults: faults.clone(),
        counters: counters.clone(),
    }));

    let mut tasks = JoinSet::new();
    tasks.spawn(amqp_accept_loop(
        listeners.amqp,
        None,
        broker.clone(),
        faults.clone(),
        counters.clone(),
    ));
    tasks.spawn(amqp_accept_loop(
        listeners.amqps,
        Some(pki.acceptor(&[])),
        broker.clone(),
        faults.clone(),
        counters.clone(),
    ));
    tasks.spawn(http::serve_plain(
        listeners.http,
        common.clone().merge(admin),
    ));
    tasks.spawn(http::serve_tls(
        listeners.https,
        pki.acceptor(&[b"http/1.1"]),
        common,
    ));

    let first_queue = queue_names.first().cloned().unwrap_or_default();
    let token_path = dir.join(FEDERATED_TOKEN_FILE);
    let subject = workload_identity
        .federated_credentials
        .first()
        .map(|c| c.subject.clone())
        .unwrap_or_default();
    let mint = {
        let oidc_issuer = oidc_issuer.clone();
        let token_path = token_path.clone();
        move || -> anyhow::Result<()> {
            let token = Entra::service_account_token(
                &issuer_key,
                &oidc_issuer,
                &subject,
                TOKEN_EXCHANGE_AUDIENCE,
                FEDERATED_TOKEN_TTL.as_secs() as i64,
            )?;
            write_atomically(&token_path, &token)
        }
    };
    mint()?;
    write_atomically(&dir.join(CA_FILE), &pki.ca_pem)?;
    write_atomically(&dir.join(ISSUER_URL_FILE), &format!("{oidc_issuer}\n"))?;
    // The effective identities with their derived ids, for scripts that need a client id.
    write_atomically(
        &dir.join(IDENTITIES_FILE),
        &serde_json::to_string_pretty(identities.as_ref())?,
    )?;
    write_atomically(
        &dir.join(EMULATOR_ENV_FILE),
        &env_file(&[
            (
                "AZURE_SERVICEBUS_CONNECTION_STRING",
                format!(
                    "Endpoint=sb://localhost:{};SharedAccessKeyName={ROOT_KEY_NAME};SharedAccessKey={sas_key};UseDevelopmentEmulator=true",
                    ports.amqp
                ),
            ),
            ("AZURE_SERVICEBUS_QUEUE_NAME", first_queue.clone()),
            (
                "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
                format!("http://localhost:{}/", ports.http),
            ),
        ]),
    )?;
    write_atomically(
        &dir.join(WORKLOAD_ENV_FILE),
        &env_file(&[
            (
                "AZURE_SERVICEBUS_HOSTNAME",
                format!("localhost:{}", ports.amqps),
            ),
            ("AZURE_SERVICEBUS_QUEUE_NAME", first_queue),
            ("AZURE_CLIENT_ID", workload_identity.client_id.clone()),
            ("AZURE_TENANT_ID", identities.tenant_id.clone()),
            ("AZURE_AUTHORITY_HOST", format!("{https_base}/")),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                token_path.display().to_string(),
            ),
            ("SSL_CERT_FILE", dir.join(CA_FILE).display().to_string()),
            (
                "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
                format!("{https_base}/"),
            ),
        ]),
    )?;
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(FEDERATED_TOKEN_REFRESH).await;
            if let Err(error) = mint() {
                tracing::error!(%error, "cannot refresh the federated token file");
            }
        }
    });

    tracing::info!(
        amqp = ports.amqp,
        amqps = ports.amqps,
        http = ports.http,
        https = ports.https,
        queues = ?queue_names,
        dir = %dir.display(),
        "sblocal ready"
    );
    announce_ready()?;

    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        Some(ended) = tasks.join_next() => {
            // Every task loops forever; one ending means a listener died.
            broker.drop_all_connections();
            anyhow::bail!("a listener stopped unexpectedly: {ended:?}");
        }
    }
    broker.drop_all_connections();
    tasks.shutdown().await;
    Ok(())
}

fn announce_ready() -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    Ok(())
}

/// Accepts AMQP connections (optionally TLS) and hands each to the broker in its own task.
async fn amqp_accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    broker: Arc<Broker>,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "AMQP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if faults.refusing_connections() {
            Counters::bump(&counters.amqp_connections_refused);
            tracing::debug!(%peer, "fault: connection refused");
            drop(stream);
            continue;
        }
        Counters::bump(&counters.amqp_connections);
        tokio::spawn(serve_amqp(stream, peer, tls.clone(), broker.clone()));
    }
}

async fn serve_amqp(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    broker: Arc<Broker>,
) {
    // Frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    match tls {
        None => broker.serve_connection(stream).await,
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(tls_stream) => broker.serve_connection(tls_stream).await,
            Err(error) => tracing::debug!(%peer, %error, "AMQP TLS handshake failed"),
        },
    }
}

/// A namespace key as Azure generates them: 32 random bytes, base64.
fn random_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `KEY=VALUE` lines, unquoted (dotenv / `docker --env-file` style).
fn env_file(entries: &[(&str, String)]) -> String {
    entries
        .iter()
        .map(|(key, value)| format!("{key}={value}\n"))
        .collect()
}

/// Writes via a temporary file and rename, so readers never see a half-written file.
pub fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, contents)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
