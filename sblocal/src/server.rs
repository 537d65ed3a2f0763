//! `sblocal serve`: binds the listeners, wires broker, validators, token endpoint and HTTP, writes
//! the files clients need (`ca.pem`, `emulator.env`, `workload.env`, a federated token file) and
//! runs until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use base64::Engine;
use ring::rand::SecureRandom;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::atom::AtomState;
use crate::auth::{JwtValidator, Rights, SasRule, SasValidator, Validator, ROOT_KEY_NAME};
use crate::broker::Broker;
use crate::config::{BrokerConfig, QueueSpec};
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
/// `Debug` hides the SAS key.
#[derive(Clone)]
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
    /// A fixed RootManageSharedAccessKey; `None` = a random key per start.
    pub sas_key: Option<String>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("dir", &self.dir)
            .field("broker_config", &self.broker_config)
            .field("amqp", &self.amqp)
            .field("amqps", &self.amqps)
            .field("http", &self.http)
            .field("https", &self.https)
            .field("identities", &self.identities)
            .field("identity", &self.identity)
            .field("token_lifetime", &self.token_lifetime)
            .field("sas_key", &self.sas_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
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

/// The ports actually bound (they differ from the flags when those say port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub amqp: u16,
    pub amqps: u16,
    pub http: u16,
    pub https: u16,
}

impl Ports {
    /// The HTTPS base URL: the authority host and the HTTPS management endpoint.
    pub fn https_base(&self) -> String {
        format!("https://localhost:{}", self.https)
    }
}

async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {flag} {addr}"))
}

async fn bind_all(options: &ServeOptions) -> anyhow::Result<(Listeners, Ports)> {
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
    Ok((listeners, ports))
}

/// Creates `dir` and removes the client files of an earlier run: they name ports that are gone,
/// and nobody should read them before `ready`.
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --dir {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("--dir {}", dir.display()))?;
    for stale in [EMULATOR_ENV_FILE, WORKLOAD_ENV_FILE, CA_FILE] {
        match std::fs::remove_file(dir.join(stale)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("cannot remove stale {stale}"));
            }
            _ => {}
        }
    }
    Ok(dir)
}

fn load_key(dir: &Path, file: &str) -> anyhow::Result<SigningKey> {
    let path = dir.join(file);
    SigningKey::load_or_create(&path).with_context(|| format!("key file {}", path.display()))
}

/// What the listeners serve, wired together.
struct Services {
    broker: Arc<Broker>,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
    /// Routes of both HTTP listeners.
    common: Router,
    /// `/$admin/` routes (plain HTTP only).
    admin: Router,
}

fn wire(
    queues: Vec<QueueSpec>,
    identities: Arc<Identities>,
    sas_key: &str,
    entra_settings: EntraSettings,
) -> Services {
    let faults = entra_settings.faults.clone();
    let counters = entra_settings.counters.clone();
    let entra = Arc::new(Entra::new(entra_settings));
    let validator = Arc::new(Validator::new(
        SasValidator::new(vec![SasRule {
            key_name: ROOT_KEY_NAME.to_string(),
            key: sas_key.to_string(),
            rights: Rights::ALL,
        }]),
        Some(JwtValidator::new(
            vec![entra.token_verifying_key()],
            entra.access_token_issuer(),
            identities,
        )),
    ));
    let broker = Broker::new(queues, validator.clone());
    let atom = Arc::new(AtomState {
        broker: broker.clone(),
        validator,
        counters: counters.clone(),
        started_at: SystemTime::now(),
    });
    let admin = http::admin_routes(Arc::new(AdminState {
        broker: broker.clone(),
        faults: faults.clone(),
        counters: counters.clone(),
    }));
    Services {
        broker,
        faults,
        counters,
        common: http::common_routes(atom, entra),
        admin,
    }
}

fn spawn_listeners(tasks: &mut JoinSet<()>, listeners: Listeners, pki: &Pki, services: &Services) {
    for (listener, tls) in [
        (listeners.amqp, None),
        (listeners.amqps, Some(pki.acceptor(&[]))),
    ] {
        tasks.spawn(amqp_accept_loop(
            listener,
            tls,
            services.broker.clone(),
            services.faults.clone(),
            services.counters.clone(),
        ));
    }
    tasks.spawn(http::serve_plain(
        listeners.http,
        services.common.clone().merge(services.admin.clone()),
    ));
    tasks.spawn(http::serve_tls(
        listeners.https,
        pki.acceptor(&[b"http/1.1"]),
        services.common.clone(),
    ));
}

/// Writes the federated token file as the kubelet projects one: a service-account token for
/// the workload identity's subject, signed by the cluster issuer key.
struct FederatedTokenFile {
    issuer_key: SigningKey,
    issuer: String,
    subject: String,
    path: PathBuf,
}

impl FederatedTokenFile {
    fn write(&self) -> anyhow::Result<()> {
        let token = Entra::service_account_token(
            &self.issuer_key,
            &self.issuer,
            &self.subject,
            TOKEN_EXCHANGE_AUDIENCE,
            FEDERATED_TOKEN_TTL.as_secs() as i64,
        )?;
        write_atomically(&self.path, &token)
    }

    /// Rewrites the file before it expires, for as long as the task runs.
    async fn keep_fresh(self) {
        loop {
            tokio::time::sleep(FEDERATED_TOKEN_REFRESH).await;
            if let Err(error) = self.write() {
                tracing::error!(%error, "cannot refresh the federated token file");
            }
        }
    }
}

/// `emulator.env`: what the official emulator gives a client.
pub fn emulator_env(ports: &Ports, sas_key: &str, queue: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "AZURE_SERVICEBUS_CONNECTION_STRING",
            format!(
                "Endpoint=sb://localhost:{};SharedAccessKeyName={ROOT_KEY_NAME};SharedAccessKey={sas_key};UseDevelopmentEmulator=true",
                ports.amqp
            ),
        ),
        ("AZURE_SERVICEBUS_QUEUE_NAME", queue.to_string()),
        (
            "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
            format!("http://localhost:{}/", ports.http),
        ),
    ]
}

/// `workload.env`: what the workload-identity webhook and the tutorial's Job spec give a pod.
pub fn workload_env(
    ports: &Ports,
    queue: &str,
    identity: &Identity,
    tenant_id: &str,
    token_file: &Path,
    ca_file: &Path,
) -> Vec<(&'static str, String)> {
    let https_base = ports.https_base();
    vec![
        (
            "AZURE_SERVICEBUS_HOSTNAME",
            format!("localhost:{}", ports.amqps),
        ),
        ("AZURE_SERVICEBUS_QUEUE_NAME", queue.to_string()),
        ("AZURE_CLIENT_ID", identity.client_id.clone()),
        ("AZURE_TENANT_ID", tenant_id.to_string()),
        ("AZURE_AUTHORITY_HOST", format!("{https_base}/")),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        ("SSL_CERT_FILE", ca_file.display().to_string()),
        (
            "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
            format!("{https_base}/"),
        ),
    ]
}

/// Runs the broker until `shutdown` resolves.
pub async fn serve(
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let workload_identity = options.workload_identity().context("--identity")?.clone();
    let dir = prepare_dir(&options.dir)?;
    let pki = Pki::generate()?;
    let issuer_key = load_key(&dir, ISSUER_KEY_FILE)?;
    let token_key = load_key(&dir, TOKEN_KEY_FILE)?;
    let (listeners, ports) = bind_all(&options).await?;

    let ServeOptions {
        broker_config,
        identities,
        token_lifetime,
        sas_key,
        ..
    } = options;
    for note in &broker_config.not_served {
        tracing::warn!("not served: {note}");
    }
    let queue_names: Vec<String> = broker_config
        .queues
        .iter()
        .map(|q| q.name.clone())
        .collect();
    let first_queue = queue_names.first().cloned().unwrap_or_default();
    let identities = Arc::new(identities);
    let oidc_issuer = format!("{}/oidc", ports.https_base());
    let sas_key = match sas_key {
        Some(key) => key,
        None => random_key()?,
    };
    let services = wire(
        broker_config.queues,
        identities.clone(),
        &sas_key,
        EntraSettings {
            authority: ports.https_base(),
            oidc_issuer: oidc_issuer.clone(),
            issuer_key: issuer_key.verifying_key(),
            token_key,
            identities: identities.clone(),
            default_lifetime: token_lifetime,
            faults: Arc::new(Faults::default()),
            counters: Arc::new(Counters::default()),
        },
    );
    let mut tasks = JoinSet::new();
    spawn_listeners(&mut tasks, listeners, &pki, &services);

    let token_file = FederatedTokenFile {
        issuer_key,
        issuer: oidc_issuer.clone(),
        subject: workload_identity
            .federated_credentials
            .first()
            .map(|c| c.subject.clone())
            .unwrap_or_default(),
        path: dir.join(FEDERATED_TOKEN_FILE),
    };
    token_file.write()?;
    let ca_file = dir.join(CA_FILE);
    write_atomically(&ca_file, &pki.ca_pem)?;
    write_atomically(&dir.join(ISSUER_URL_FILE), &format!("{oidc_issuer}\n"))?;
    // The effective identities with their derived ids, for scripts that need a client id.
    write_atomically(
        &dir.join(IDENTITIES_FILE),
        &serde_json::to_string_pretty(identities.as_ref())?,
    )?;
    write_atomically(
        &dir.join(EMULATOR_ENV_FILE),
        &env_file(&emulator_env(&ports, &sas_key, &first_queue)),
    )?;
    write_atomically(
        &dir.join(WORKLOAD_ENV_FILE),
        &env_file(&workload_env(
            &ports,
            &first_queue,
            &workload_identity,
            &identities.tenant_id,
            &token_file.path,
            &ca_file,
        )),
    )?;
    tasks.spawn(token_file.keep_fresh());

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
            services.broker.drop_all_connections();
            anyhow::bail!("a listener stopped unexpectedly: {ended:?}");
        }
    }
    services.broker.drop_all_connections();
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
        Some(acceptor) => {
            match tokio::time::timeout(http::TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => broker.serve_connection(tls_stream).await,
                Ok(Err(error)) => tracing::debug!(%peer, %error, "AMQP TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "AMQP TLS handshake timed out"),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: Ports = Ports {
        amqp: 5672,
        amqps: 5671,
        http: 5300,
        https: 5443,
    };

    fn lookup(entries: &[(&'static str, String)], key: &str) -> String {
        entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{key} missing"))
    }

    #[test]
    fn serve_options_debug_output_hides_the_sas_key() {
        let any_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let options = ServeOptions {
            dir: PathBuf::from("/d"),
            broker_config: BrokerConfig::default(),
            amqp: any_addr,
            amqps: any_addr,
            http: any_addr,
            https: any_addr,
            identities: Identities::defaults(),
            identity: "servicebusdemo".into(),
            token_lifetime: Duration::from_secs(3600),
            sas_key: Some("c2FzLWtleS12YWx1ZQ==".into()),
        };
        let debug = format!("{options:?}");
        assert!(!debug.contains("c2FzLWtleS12YWx1ZQ=="), "{debug}");
        assert!(debug.contains("sas_key: Some(\"<redacted>\")"), "{debug}");
        assert!(debug.contains("servicebusdemo"), "{debug}");
    }

    #[test]
    fn emulator_env_is_the_emulators_connection_string() {
        let env = emulator_env(&PORTS, "a2V5", "queue.1");
        assert_eq!(
            lookup(&env, "AZURE_SERVICEBUS_CONNECTION_STRING"),
            "Endpoint=sb://localhost:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=a2V5;UseDevelopmentEmulator=true"
        );
        assert_eq!(lookup(&env, "AZURE_SERVICEBUS_QUEUE_NAME"), "queue.1");
        assert_eq!(
            lookup(&env, "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT"),
            "http://localhost:5300/"
        );
    }

    #[test]
    fn workload_env_points_at_tls_and_https() {
        let identities = Identities::defaults();
        let identity = identities.by_name("servicebusdemo").expect("default");
        let env = workload_env(
            &PORTS,
            "queue.1",
            identity,
            &identities.tenant_id,
            Path::new("/d/azure-identity-token"),
            Path::new("/d/ca.pem"),
        );
        let keys: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "AZURE_SERVICEBUS_HOSTNAME",
                "AZURE_SERVICEBUS_QUEUE_NAME",
                "AZURE_CLIENT_ID",
                "AZURE_TENANT_ID",
                "AZURE_AUTHORITY_HOST",
                "AZURE_FEDERATED_TOKEN_FILE",
                "SSL_CERT_FILE",
                "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
            ]
        );
        assert_eq!(lookup(&env, "AZURE_SERVICEBUS_HOSTNAME"), "localhost:5671");
        assert_eq!(lookup(&env, "AZURE_CLIENT_ID"), identity.client_id);
        assert_eq!(
            lookup(&env, "AZURE_AUTHORITY_HOST"),
            "https://localhost:5443/"
        );
        assert_eq!(
            lookup(&env, "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT"),
            "https://localhost:5443/"
        );
    }

    #[test]
    fn env_files_are_plain_lines() {
        assert_eq!(
            env_file(&[("A", "x=y;z".to_string()), ("B", String::new())]),
            "A=x=y;z\nB=\n"
        );
    }

    #[test]
    fn stale_client_files_are_removed_and_keys_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(EMULATOR_ENV_FILE), "old").expect("write");
        let key = load_key(dir.path(), ISSUER_KEY_FILE).expect("created");
        let prepared = prepare_dir(dir.path()).expect("prepared");
        assert!(!prepared.join(EMULATOR_ENV_FILE).exists());
        let again = load_key(&prepared, ISSUER_KEY_FILE).expect("loaded");
        assert_eq!(key.kid(), again.kid());
    }
}
