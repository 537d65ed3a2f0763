//! Every setting of every mode, parsed and validated once, before anything connects.
//!
//! Each setting is a command-line flag and an environment variable (clap `env`). Values are
//! taken as strings and validated here, so a bad value produces one line that names the
//! environment variable and says what is wrong, and exit code 2. `azure_identity` reads its
//! own standard variables (`AZURE_AUTHORITY_HOST`, `IDENTITY_ENDPOINT`, ...) itself; the ones
//! the workload-identity decision depends on are read here too, so they are checked early.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::telemetry::{LogFormat, TracingConfig};

/// Default body, as the tutorial's consumer logs show it.
pub const DEFAULT_MESSAGE_BODY: &str = "Hello World!";
/// Producer default when MESSAGE_COUNT is not set: the tutorial's producer Job.
pub const DEFAULT_PRODUCER_COUNT: u64 = 100;
/// Largest body we are willing to build (Premium tier's limit is 100 MB).
pub const MAX_MESSAGE_SIZE: u64 = 100 * 1024 * 1024;
/// Longest duration any setting accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// The TLS port of every Service Bus namespace.
pub const AMQPS_PORT: u16 = 5671;
/// The plain AMQP port of the emulator (and of `sblocal`).
pub const AMQP_PORT: u16 = 5672;

/// A configuration error: which setting, and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    /// The environment variable name (each also has a flag).
    pub setting: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// Operation mode (`OPERATION_MODE` or the subcommand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Subcommand)]
pub enum Mode {
    /// Send MESSAGE_COUNT messages, then exit.
    Producer,
    /// Receive up to MESSAGE_COUNT messages (0 = until stopped), then exit.
    Consumer,
    /// Serve KEDA's external scaler gRPC API with the queue's message count.
    Scaler,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Producer => "producer",
            Mode::Consumer => "consumer",
            Mode::Scaler => "scaler",
        }
    }
}

/// Raw command line and environment. Everything is a string here; [`Config::from_args`]
/// turns it into typed values with errors that name the variable. `Debug` hides the
/// connection string (it holds a key or a signature).
#[derive(Parser)]
#[command(
    name = "servicebusdemo",
    version,
    about = "Azure Service Bus producer, consumer and KEDA external scaler (workload identity or SAS)",
    after_help = "Exit codes: 0 success, 2 bad configuration, 1 failure at run time."
)]
pub struct Args {
    /// Mode as a subcommand (alternative to OPERATION_MODE).
    #[command(subcommand)]
    pub command: Option<Mode>,

    /// producer | consumer | scaler.
    #[arg(long, env = "OPERATION_MODE", global = true)]
    pub operation_mode: Option<String>,

    /// Messages to send (producer, default 100) or to receive (consumer, default 0 = until stopped).
    #[arg(long, env = "MESSAGE_COUNT", global = true)]
    pub message_count: Option<String>,

    /// Queue name (default: the connection string's EntityPath, which it must match).
    #[arg(long, env = "AZURE_SERVICEBUS_QUEUE_NAME", global = true)]
    pub queue_name: Option<String>,

    /// Namespace host name, e.g. mynamespace.servicebus.windows.net (host:port for local brokers).
    #[arg(long, env = "AZURE_SERVICEBUS_HOSTNAME", global = true)]
    pub hostname: Option<String>,

    /// SAS connection string (alternative to the host name and an Entra identity); prefer the
    /// variable: a flag's value is visible in the process list.
    #[arg(
        long,
        env = "AZURE_SERVICEBUS_CONNECTION_STRING",
        hide_env_values = true,
        global = true
    )]
    pub connection_string: Option<String>,

    /// Management (ATOM) base URL for the scaler; default https://{hostname}/.
    #[arg(long, env = "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT", global = true)]
    pub management_endpoint: Option<String>,

    /// Entra application (client) id; set by the workload-identity webhook.
    #[arg(long, env = "AZURE_CLIENT_ID", global = true)]
    pub client_id: Option<String>,

    /// Entra tenant id; set by the workload-identity webhook.
    #[arg(long, env = "AZURE_TENANT_ID", global = true)]
    pub tenant_id: Option<String>,

    /// Projected service-account token file; set by the workload-identity webhook.
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE", global = true)]
    pub federated_token_file: Option<String>,

    /// Entra authority; set by the workload-identity webhook (default https://login.microsoftonline.com/).
    #[arg(long, env = "AZURE_AUTHORITY_HOST", global = true)]
    pub authority_host: Option<String>,

    /// Message body (producer).
    #[arg(long, env = "MESSAGE_BODY", global = true)]
    pub message_body: Option<String>,

    /// Body size in bytes; the body is padded with spaces up to it (producer).
    #[arg(long, env = "MESSAGE_SIZE", global = true)]
    pub message_size: Option<String>,

    /// Time spent processing each message, e.g. 500ms (consumer).
    #[arg(long, env = "PROCESSING_DELAY", global = true)]
    pub processing_delay: Option<String>,

    /// Exit when the queue stays empty this long, e.g. 30s (consumer; not with MESSAGE_COUNT=0).
    #[arg(long, env = "CONSUMER_IDLE_TIMEOUT", global = true)]
    pub consumer_idle_timeout: Option<String>,

    /// Messages to prefetch (consumer; never more than still wanted).
    #[arg(long, env = "PREFETCH", global = true)]
    pub prefetch: Option<String>,

    /// Processing attempts before a failing message is dead-lettered (consumer, default 3).
    #[arg(long, env = "MAX_PROCESSING_ATTEMPTS", global = true)]
    pub max_processing_attempts: Option<String>,

    /// Processing fails for bodies containing this text (consumer; shows the dead-letter path).
    #[arg(long, env = "PROCESSING_FAIL_MATCH", global = true)]
    pub processing_fail_match: Option<String>,

    /// Timeout of one broker operation (connect, attach, send, token), e.g. 30s.
    #[arg(long, env = "OPERATION_TIMEOUT", global = true)]
    pub operation_timeout: Option<String>,

    /// Retries of a transient failure before giving up (default 5).
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", global = true)]
    pub retry_max_attempts: Option<String>,

    /// First retry delay; doubles each retry, with jitter (default 500ms).
    #[arg(long, env = "RETRY_BASE_DELAY", global = true)]
    pub retry_base_delay: Option<String>,

    /// Upper bound of a retry delay (default 30s).
    #[arg(long, env = "RETRY_MAX_DELAY", global = true)]
    pub retry_max_delay: Option<String>,

    /// Address of /metrics, /healthz and /readyz (port 0 = any free port).
    #[arg(long, env = "METRICS_ADDR", global = true)]
    pub metrics_addr: Option<String>,

    /// text | json.
    #[arg(long, env = "LOG_FORMAT", global = true)]
    pub log_format: Option<String>,

    /// Log filter, e.g. info or servicebusdemo=debug.
    #[arg(long, env = "RUST_LOG", global = true)]
    pub log_filter: Option<String>,

    /// OTLP gRPC endpoint for traces, e.g. http://otel-collector:4317.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// Scaler gRPC address.
    #[arg(long, env = "SCALER_GRPC_ADDR", global = true)]
    pub scaler_grpc_addr: Option<String>,

    /// How long a queue count is reused before the management endpoint is asked again.
    #[arg(long, env = "SCALER_CACHE_TTL", global = true)]
    pub scaler_cache_ttl: Option<String>,

    /// How old a count may be when it is served because a refresh failed transiently.
    #[arg(long, env = "SCALER_MAX_STALENESS", global = true)]
    pub scaler_max_staleness: Option<String>,

    /// Comma-separated queues the scaler polls for its gauges (default the queue name).
    #[arg(long, env = "SCALER_QUEUES", global = true)]
    pub scaler_queues: Option<String>,

    /// PEM certificate of the scaler's gRPC server (enables TLS).
    #[arg(long, env = "SCALER_TLS_CERT_FILE", global = true)]
    pub scaler_tls_cert_file: Option<String>,

    /// PEM private key of the scaler's gRPC server.
    #[arg(long, env = "SCALER_TLS_KEY_FILE", global = true)]
    pub scaler_tls_key_file: Option<String>,

    /// PEM CA that client certificates must chain to (enables mutual TLS).
    #[arg(long, env = "SCALER_TLS_CLIENT_CA_FILE", global = true)]
    pub scaler_tls_client_ca_file: Option<String>,
}

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("command", &self.command)
            .field("operation_mode", &self.operation_mode)
            .field("message_count", &self.message_count)
            .field("queue_name", &self.queue_name)
            .field("hostname", &self.hostname)
            .field(
                "connection_string",
                &self.connection_string.as_ref().map(|_| "<redacted>"),
            )
            .field("management_endpoint", &self.management_endpoint)
            .field("client_id", &self.client_id)
            .field("tenant_id", &self.tenant_id)
            .field("federated_token_file", &self.federated_token_file)
            .field("authority_host", &self.authority_host)
            .field("message_body", &self.message_body)
            .field("message_size", &self.message_size)
            .field("processing_delay", &self.processing_delay)
            .field("consumer_idle_timeout", &self.consumer_idle_timeout)
            .field("prefetch", &self.prefetch)
            .field("max_processing_attempts", &self.max_processing_attempts)
            .field("processing_fail_match", &self.processing_fail_match)
            .field("operation_timeout", &self.operation_timeout)
            .field("retry_max_attempts", &self.retry_max_attempts)
            .field("retry_base_delay", &self.retry_base_delay)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_format", &self.log_format)
            .field("log_filter", &self.log_filter)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("scaler_grpc_addr", &self.scaler_grpc_addr)
            .field("scaler_cache_ttl", &self.scaler_cache_ttl)
            .field("scaler_max_staleness", &self.scaler_max_staleness)
            .field("scaler_queues", &self.scaler_queues)
            .field("scaler_tls_cert_file", &self.scaler_tls_cert_file)
            .field("scaler_tls_key_file", &self.scaler_tls_key_file)
            .field("scaler_tls_client_ca_file", &self.scaler_tls_client_ca_file)
            .finish()
    }
}

/// How the AMQP connection is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// AMQP over TLS (`amqps`), the only option on Azure.
    Tls,
    /// Plain AMQP: the emulator (`UseDevelopmentEmulator=true`) and local brokers.
    Plain,
}

/// Where the namespace is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Host name without port, e.g. `mynamespace.servicebus.windows.net` or `localhost`.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    pub transport: Transport,
}

impl Namespace {
    /// `host:port`, as a socket address string.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The token audience (`sb://host/entity`) Service Bus expects for an entity.
    pub fn audience(&self, entity: &str) -> String {
        format!("sb://{}/{}", self.host, entity)
    }
}

/// A shared access key from a connection string. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedAccessKey {
    pub key_name: String,
    pub key: String,
}

impl std::fmt::Debug for SharedAccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAccessKey")
            .field("key_name", &self.key_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Where tokens come from. `Debug` never shows a key or signature.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// A connection string with a key: we sign SAS tokens ourselves.
    SharedAccessKey(SharedAccessKey),
    /// A connection string with a ready-made `SharedAccessSignature` (used as is until it expires).
    SharedAccessSignature(String),
    /// The workload-identity webhook's variables: a federated token exchanged at Entra.
    WorkloadIdentity {
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
        authority_host: Option<String>,
    },
    /// No webhook variables: managed identity, then developer tools (Azure CLI, azd).
    Ambient {
        /// A user-assigned managed identity's client id, when AZURE_CLIENT_ID is set.
        client_id: Option<String>,
    },
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthConfig::SharedAccessKey(key) => {
                f.debug_tuple("SharedAccessKey").field(key).finish()
            }
            AuthConfig::SharedAccessSignature(_) => f
                .debug_tuple("SharedAccessSignature")
                .field(&"<redacted>")
                .finish(),
            AuthConfig::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
                authority_host,
            } => f
                .debug_struct("WorkloadIdentity")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("token_file", token_file)
                .field("authority_host", authority_host)
                .finish(),
            AuthConfig::Ambient { client_id } => f
                .debug_struct("Ambient")
                .field("client_id", client_id)
                .finish(),
        }
    }
}

/// Retry of transient failures: exponential backoff with jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

/// Settings every mode shares.
#[derive(Clone, Debug)]
pub struct CommonConfig {
    pub namespace: Namespace,
    pub auth: AuthConfig,
    pub metrics_addr: SocketAddr,
    pub tracing: TracingConfig,
    pub operation_timeout: Duration,
    pub retry: RetryConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerConfig {
    pub queue: String,
    pub message_count: u64,
    /// The body, already padded to MESSAGE_SIZE.
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerConfig {
    pub queue: String,
    /// 0 = run until stopped.
    pub message_count: u64,
    pub processing_delay: Duration,
    /// `None` when MESSAGE_COUNT=0: a continuous worker never exits for being idle.
    pub idle_timeout: Option<Duration>,
    pub prefetch: u32,
    pub max_processing_attempts: u32,
    pub processing_fail_match: Option<String>,
}

/// TLS files of the scaler's gRPC server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set: clients must present a certificate chaining to this CA (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalerConfig {
    pub grpc_addr: SocketAddr,
    /// ATOM base URL, ending in `/`.
    pub management_endpoint: url::Url,
    pub cache_ttl: Duration,
    pub max_staleness: Duration,
    /// Queues polled in the background for the gauges.
    pub queues: Vec<String>,
    pub tls: Option<ScalerTlsConfig>,
}

#[derive(Clone, Debug)]
pub enum ModeConfig {
    Producer(ProducerConfig),
    Consumer(ConsumerConfig),
    Scaler(ScalerConfig),
}

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub mode: ModeConfig,
    /// Settings that were accepted but have no effect, to log once logging is up.
    pub notes: Vec<String>,
}

impl Config {
    pub fn mode(&self) -> Mode {
        match self.mode {
            ModeConfig::Producer(_) => Mode::Producer,
            ModeConfig::Consumer(_) => Mode::Consumer,
            ModeConfig::Scaler(_) => Mode::Scaler,
        }
    }

    /// Validate everything. No I/O except checking that named files are readable.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let mode = parse_mode(&args)?;
        let (namespace, auth, entity_path) = parse_namespace_and_auth(&args)?;
        let common = parse_common(&args, mode, namespace, auth)?;
        let queue = parse_queue_name(&args, entity_path.as_deref())?;
        let mut notes = Vec::new();
        let mode = match mode {
            Mode::Producer => ModeConfig::Producer(parse_producer(&args, queue)?),
            Mode::Consumer => ModeConfig::Consumer(parse_consumer(&args, queue, &mut notes)?),
            Mode::Scaler => ModeConfig::Scaler(parse_scaler(&args, queue, &common.namespace)?),
        };
        Ok(Config {
            common,
            mode,
            notes,
        })
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn parse_mode(args: &Args) -> Result<Mode, ConfigError> {
    let from_env = match non_empty(&args.operation_mode) {
        Some(value) => Some(Mode::from_str(value, true).map_err(|_| {
            ConfigError::new(
                "OPERATION_MODE",
                format!("invalid value {value:?}: expected producer, consumer or scaler"),
            )
        })?),
        None => None,
    };
    match (args.command, from_env) {
        (Some(cmd), Some(env)) if cmd != env => Err(ConfigError::new(
            "OPERATION_MODE",
            format!(
                "is {:?} but the subcommand says {:?}; use one",
                env.as_str(),
                cmd.as_str()
            ),
        )),
        (Some(mode), _) | (None, Some(mode)) => Ok(mode),
        (None, None) => Err(ConfigError::new(
            "OPERATION_MODE",
            "not set: expected producer, consumer or scaler (or the subcommand)",
        )),
    }
}

fn parse_common(
    args: &Args,
    mode: Mode,
    namespace: Namespace,
    auth: AuthConfig,
) -> Result<CommonConfig, ConfigError> {
    let metrics_addr = parse_socket_addr(
        "METRICS_ADDR",
        non_empty(&args.metrics_addr).unwrap_or("0.0.0.0:8080"),
    )?;
    let log_format = match non_empty(&args.log_format).map(str::to_ascii_lowercase) {
        None => LogFormat::Text,
        Some(v) if v == "text" => LogFormat::Text,
        Some(v) if v == "json" => LogFormat::Json,
        Some(v) => {
            return Err(ConfigError::new(
                "LOG_FORMAT",
                format!("invalid value {v:?}: expected text or json"),
            ))
        }
    };
    if let Some(filter) = non_empty(&args.log_filter) {
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|err| {
            ConfigError::new("RUST_LOG", format!("invalid filter {filter:?}: {err}"))
        })?;
    }
    let otlp_endpoint = match non_empty(&args.otlp_endpoint) {
        Some(endpoint) => {
            let url = url::Url::parse(endpoint).map_err(|err| {
                ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("invalid URL {endpoint:?}: {err}"),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("invalid URL {endpoint:?}: expected http:// or https://"),
                ));
            }
            Some(endpoint.to_string())
        }
        None => None,
    };
    let tracing = TracingConfig {
        log_format,
        log_filter: non_empty(&args.log_filter).map(str::to_string),
        otlp_endpoint,
        service_name: format!("servicebusdemo-{}", mode.as_str()),
    };
    let operation_timeout = parse_duration_setting(
        "OPERATION_TIMEOUT",
        &args.operation_timeout,
        Duration::from_secs(30),
    )?;
    if operation_timeout.is_zero() {
        return Err(ConfigError::new("OPERATION_TIMEOUT", "must be more than 0"));
    }
    let retry = RetryConfig {
        max_attempts: parse_number("RETRY_MAX_ATTEMPTS", &args.retry_max_attempts, 5u32)?,
        base_delay: parse_duration_setting(
            "RETRY_BASE_DELAY",
            &args.retry_base_delay,
            Duration::from_millis(500),
        )?,
        max_delay: parse_duration_setting(
            "RETRY_MAX_DELAY",
            &args.retry_max_delay,
            Duration::from_secs(30),
        )?,
    };
    if retry.max_delay < retry.base_delay {
        return Err(ConfigError::new(
            "RETRY_MAX_DELAY",
            "must not be shorter than RETRY_BASE_DELAY",
        ));
    }
    Ok(CommonConfig {
        namespace,
        auth,
        metrics_addr,
        tracing,
        operation_timeout,
        retry,
    })
}

/// The namespace, the credentials and, for a connection string scoped to one entity, its
/// `EntityPath`.
fn parse_namespace_and_auth(
    args: &Args,
) -> Result<(Namespace, AuthConfig, Option<String>), ConfigError> {
    let hostname = non_empty(&args.hostname);
    let connection_string = non_empty(&args.connection_string);
    match (hostname, connection_string) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            "AZURE_SERVICEBUS_CONNECTION_STRING",
            "set together with AZURE_SERVICEBUS_HOSTNAME; set only one of them",
        )),
        (None, None) => Err(ConfigError::new(
            "AZURE_SERVICEBUS_HOSTNAME",
            "not set: set the namespace host name (Entra identity) or AZURE_SERVICEBUS_CONNECTION_STRING (SAS)",
        )),
        (None, Some(cs)) => {
            let parsed = ConnectionString::parse(cs)?;
            Ok((parsed.namespace, parsed.auth, parsed.entity_path))
        }
        (Some(host), None) => {
            let namespace = parse_hostname(host)?;
            let auth = parse_identity(args)?;
            Ok((namespace, auth, None))
        }
    }
}

/// A namespace host name: `ns.servicebus.windows.net` or `host:port`; no scheme, no path.
pub fn parse_hostname(value: &str) -> Result<Namespace, ConfigError> {
    const SETTING: &str = "AZURE_SERVICEBUS_HOSTNAME";
    if value.contains("://") {
        return Err(ConfigError::new(
            SETTING,
            format!("{value:?} has a scheme; give the host name only, e.g. mynamespace.servicebus.windows.net"),
        ));
    }
    if value.contains('/') || value.contains('?') || value.contains('@') {
        return Err(ConfigError::new(
            SETTING,
            format!("{value:?} is not a host name (no path, query or user allowed)"),
        ));
    }
    let (host, port) = split_host_port(value).map_err(|problem| {
        ConfigError::new(SETTING, format!("{value:?} is not a host name: {problem}"))
    })?;
    Ok(Namespace {
        host,
        port: port.unwrap_or(AMQPS_PORT),
        transport: Transport::Tls,
    })
}

/// Split `host[:port]`, validating the host's characters.
fn split_host_port(value: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) => {
            let port: u16 = port.parse().map_err(|_| format!("invalid port {port:?}"))?;
            if port == 0 {
                return Err("port 0 is not a port to connect to".into());
            }
            (host, Some(port))
        }
        None => (value, None),
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    let valid = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !valid || host.starts_with('.') || host.ends_with('.') && host.len() == 1 {
        return Err(format!("invalid characters in host {host:?}"));
    }
    // The host also goes into URLs (token audience, management endpoint); a name URL
    // parsing refuses, such as an all-digit one read as an out-of-range IPv4 address, must
    // be reported here rather than as a problem with a setting the user never gave.
    url::Host::parse(host).map_err(|err| format!("{host:?} is not a valid host: {err}"))?;
    Ok((host.to_ascii_lowercase(), port))
}

fn parse_identity(args: &Args) -> Result<AuthConfig, ConfigError> {
    let client_id = non_empty(&args.client_id).map(str::to_string);
    let tenant_id = non_empty(&args.tenant_id).map(str::to_string);
    let token_file = non_empty(&args.federated_token_file);
    let authority_host = match non_empty(&args.authority_host) {
        Some(value) => Some(parse_authority_host(value)?),
        None => None,
    };
    let Some(token_file) = token_file else {
        return Ok(AuthConfig::Ambient { client_id });
    };
    // The webhook sets all of these together; a partial set is a broken pod spec.
    let tenant_id = tenant_id.ok_or_else(|| {
        ConfigError::new(
            "AZURE_TENANT_ID",
            "not set, but AZURE_FEDERATED_TOKEN_FILE is (workload identity needs both)",
        )
    })?;
    let client_id = client_id.ok_or_else(|| {
        ConfigError::new(
            "AZURE_CLIENT_ID",
            "not set, but AZURE_FEDERATED_TOKEN_FILE is (workload identity needs both)",
        )
    })?;
    let token_file = PathBuf::from(token_file);
    check_token_file(&token_file)?;
    Ok(AuthConfig::WorkloadIdentity {
        tenant_id,
        client_id,
        token_file,
        authority_host,
    })
}

fn parse_authority_host(value: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(value).map_err(|err| {
        ConfigError::new(
            "AZURE_AUTHORITY_HOST",
            format!("invalid URL {value:?}: {err}"),
        )
    })?;
    // azure_identity refuses anything else at the first token request; refuse it now.
    if url.scheme() != "https" {
        return Err(ConfigError::new(
            "AZURE_AUTHORITY_HOST",
            format!("{value:?} must be an https:// URL"),
        ));
    }
    Ok(value.to_string())
}

fn check_readable(setting: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    // Opening a directory succeeds on Linux; reading it would only fail later, at run time.
    if path.is_dir() {
        return Err(ConfigError::new(
            setting,
            format!(
                "cannot read {}: it is a directory, not a file",
                path.display()
            ),
        ));
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|err| ConfigError::new(setting, format!("cannot read {}: {err}", path.display())))
}

/// A readable PEM file with at least one certificate (the scaler's chain, or a CA). Checked
/// here so that a wrong file is a configuration error naming its setting, not a failure of
/// the gRPC server after start-up.
fn check_certificates(setting: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    check_readable(setting, path)?;
    let mut certificates = CertificateDer::pem_file_iter(path).map_err(|err| {
        ConfigError::new(setting, format!("cannot read {}: {err}", path.display()))
    })?;
    match certificates.next() {
        Some(Ok(_)) => Ok(()),
        Some(Err(err)) => Err(ConfigError::new(
            setting,
            format!("{} is not valid PEM: {err}", path.display()),
        )),
        None => Err(ConfigError::new(
            setting,
            format!("{} holds no PEM certificate", path.display()),
        )),
    }
}

/// A readable PEM file with a private key (PKCS#8, RSA or EC). The key itself is never shown.
fn check_private_key(setting: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    check_readable(setting, path)?;
    PrivateKeyDer::from_pem_file(path).map(drop).map_err(|err| {
        let problem = match err {
            rustls::pki_types::pem::Error::NoItemsFound => "holds no PEM private key".to_string(),
            rustls::pki_types::pem::Error::Io(err) => format!("cannot be read: {err}"),
            _ => "is not a valid PEM private key".to_string(),
        };
        ConfigError::new(setting, format!("{} {problem}", path.display()))
    })
}

/// The projected service-account token: a readable file holding a token. It is read again
/// on every token request (the kubelet rotates it); an empty one can never be exchanged.
fn check_token_file(path: &std::path::Path) -> Result<(), ConfigError> {
    const SETTING: &str = "AZURE_FEDERATED_TOKEN_FILE";
    check_readable(SETTING, path)?;
    let token = std::fs::read(path).map_err(|err| {
        ConfigError::new(SETTING, format!("cannot read {}: {err}", path.display()))
    })?;
    if token.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(
            SETTING,
            format!(
                "{} is empty: no service-account token to exchange",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A parsed Service Bus connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionString {
    pub namespace: Namespace,
    pub auth: AuthConfig,
    /// `EntityPath`, when the string is scoped to one entity.
    pub entity_path: Option<String>,
}

impl ConnectionString {
    /// Parse `Endpoint=sb://host[:port][/];SharedAccessKeyName=..;SharedAccessKey=..[;EntityPath=..]
    /// [;UseDevelopmentEmulator=true]` (or `SharedAccessSignature=...` instead of the key pair).
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        const SETTING: &str = "AZURE_SERVICEBUS_CONNECTION_STRING";
        let bad = |problem: String| ConfigError::new(SETTING, problem);
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut signature = None;
        let mut entity_path = None;
        let mut emulator = false;
        for part in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            // Values (keys are base64) may contain '='; split at the first one only.
            let Some((name, val)) = part.split_once('=') else {
                return Err(bad(format!(
                    "malformed: part {} is not Name=Value",
                    shown_part(part)
                )));
            };
            let val = val.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(val),
                "sharedaccesskeyname" => key_name = Some(val),
                "sharedaccesskey" => key = Some(val),
                "sharedaccesssignature" => signature = Some(val),
                "entitypath" => entity_path = Some(val.to_string()),
                "usedevelopmentemulator" => {
                    emulator = match val.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(bad(format!(
                                "malformed: UseDevelopmentEmulator={}, expected true or false",
                                shown_word(val)
                            )))
                        }
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "malformed: unknown part {}",
                        shown_part(name.trim())
                    )));
                }
            }
        }
        let endpoint = endpoint.ok_or_else(|| bad("malformed: no Endpoint=sb://...".into()))?;
        let namespace = parse_endpoint(endpoint, emulator).map_err(bad)?;
        let auth = match (key_name, key, signature) {
            (Some(name), Some(key), None) if !name.is_empty() && !key.is_empty() => {
                AuthConfig::SharedAccessKey(SharedAccessKey {
                    key_name: name.to_string(),
                    key: key.to_string(),
                })
            }
            (None, None, Some(sig)) if sig.starts_with("SharedAccessSignature ") => {
                AuthConfig::SharedAccessSignature(sig.to_string())
            }
            (None, None, Some(_)) => {
                return Err(bad(
                    "malformed: SharedAccessSignature must start with \"SharedAccessSignature \""
                        .into(),
                ))
            }
            _ => {
                return Err(bad(
                    "malformed: expected SharedAccessKeyName and SharedAccessKey (or SharedAccessSignature alone)"
                        .into(),
                ))
            }
        };
        Ok(Self {
            namespace,
            auth,
            entity_path,
        })
    }
}

/// The parts a connection string may have, as the portal writes them.
const CONNECTION_STRING_PARTS: [&str; 6] = [
    "Endpoint",
    "SharedAccessKeyName",
    "SharedAccessKey",
    "SharedAccessSignature",
    "EntityPath",
    "UseDevelopmentEmulator",
];

/// A part (or a part's name) that failed to parse, as an error may show it. Anything in a
/// connection string may be a key pasted in the wrong place (a lost name or `;`), so no text
/// of it is echoed unless it cannot be key material: a known part name it starts with, or a
/// short purely alphabetic name (base64 keys are 44 characters with digits and symbols).
fn shown_part(part: &str) -> String {
    let known = CONNECTION_STRING_PARTS
        .iter()
        .filter(|name| {
            part.get(..name.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(name))
        })
        .max_by_key(|name| name.len());
    match known {
        Some(name) if name.len() == part.len() => format!("{name:?}"),
        Some(name) => format!("\"{name}...\""),
        None => shown_word(part),
    }
}

/// A value as an error may show it: a short alphabetic word (`yes`, `Bogus`) as it is,
/// anything else not at all.
fn shown_word(text: &str) -> String {
    if (1..=24).contains(&text.len()) && text.chars().all(|c| c.is_ascii_alphabetic()) {
        format!("{text:?}")
    } else {
        "(not shown: it may hold a key; is a ';' missing?)".to_string()
    }
}

/// Errors here never echo the endpoint: with a `;` lost, it carries the key that followed.
fn parse_endpoint(endpoint: &str, emulator: bool) -> Result<Namespace, String> {
    let url = url::Url::parse(endpoint)
        .map_err(|err| format!("malformed: Endpoint is not a URL ({err})"))?;
    if !matches!(url.scheme(), "sb" | "amqp" | "amqps") {
        return Err("malformed: Endpoint must start with sb://".into());
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "malformed: Endpoint has no host".to_string())?;
    // sb:// URLs take almost anything as a host; a key glued on by a lost ';' would be one.
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
    {
        return Err(
            "malformed: Endpoint's host is not a host name (or a ';' is missing after it)".into(),
        );
    }
    if !matches!(url.path(), "" | "/") {
        return Err(
            "malformed: Endpoint must not have a path (use EntityPath; or a ';' is missing after it)"
                .into(),
        );
    }
    let plain = emulator || url.scheme() == "amqp";
    let transport = if plain {
        Transport::Plain
    } else {
        Transport::Tls
    };
    let default_port = if plain { AMQP_PORT } else { AMQPS_PORT };
    Ok(Namespace {
        host: host.to_ascii_lowercase(),
        port: url.port().unwrap_or(default_port),
        transport,
    })
}

/// The queue: AZURE_SERVICEBUS_QUEUE_NAME, or else the `EntityPath` of a connection string
/// scoped to one queue. When both are given they must agree: the string's key only opens
/// its own entity, so any other queue would fail at the first request.
fn parse_queue_name(args: &Args, entity_path: Option<&str>) -> Result<Option<String>, ConfigError> {
    const SETTING: &str = "AZURE_SERVICEBUS_QUEUE_NAME";
    let entity_path = entity_path.filter(|path| !path.is_empty());
    match (non_empty(&args.queue_name), entity_path) {
        (Some(name), entity_path) => {
            validate_entity_name(name).map_err(|problem| ConfigError::new(SETTING, problem))?;
            match entity_path {
                Some(path) if !names_queue_of(name, path) => Err(ConfigError::new(
                    SETTING,
                    format!(
                        "{name:?} is not the queue AZURE_SERVICEBUS_CONNECTION_STRING is scoped to (EntityPath={}); unset one of them or make them agree",
                        shown_entity_path(path)
                    ),
                )),
                _ => Ok(Some(name.to_string())),
            }
        }
        (None, Some(path)) => match entity_name_problem(path) {
            Some(problem) => Err(ConfigError::new(
                "AZURE_SERVICEBUS_CONNECTION_STRING",
                format!("EntityPath {} {problem}", shown_entity_path(path)),
            )),
            None => Ok(Some(path.to_string())),
        },
        (None, None) => Ok(None),
    }
}

/// Whether queue name `name` reads the entity `entity_path`: the entity itself or its
/// dead-letter sub-queue. Service Bus entity names are case-insensitive.
fn names_queue_of(name: &str, entity_path: &str) -> bool {
    let base = name.strip_suffix(DEAD_LETTER_SUFFIX).unwrap_or(name);
    name.eq_ignore_ascii_case(entity_path) || base.eq_ignore_ascii_case(entity_path)
}

/// A queue the mode cannot run without.
fn require_queue(queue: Option<String>) -> Result<String, ConfigError> {
    queue.ok_or_else(|| {
        ConfigError::new(
            "AZURE_SERVICEBUS_QUEUE_NAME",
            "not set: the queue to use (or EntityPath in AZURE_SERVICEBUS_CONNECTION_STRING)",
        )
    })
}

/// The path of a queue's dead-letter sub-queue, relative to the queue.
const DEAD_LETTER_SUFFIX: &str = "/$DeadLetterQueue";

/// Service Bus queue names: up to 260 characters, letters, digits, `.`, `-`, `_`, `/`
/// (not at the start or end).
pub fn validate_entity_name(name: &str) -> Result<(), String> {
    entity_name_problem(name).map_or(Ok(()), |problem| Err(format!("{name:?} {problem}")))
}

/// What is wrong with a queue name, without the name (the caller decides whether to show it).
fn entity_name_problem(name: &str) -> Option<&'static str> {
    // A queue's dead-letter sub-queue can be read like a queue.
    let name = name.strip_suffix(DEAD_LETTER_SUFFIX).unwrap_or(name);
    if name.is_empty() {
        return Some("is an empty queue name");
    }
    if name.len() > 260 {
        return Some("is longer than 260 characters");
    }
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
    if !valid {
        return Some("has invalid characters (letters, digits, '.', '-', '_', '/' only)");
    }
    if name.starts_with(['/', '.', '-']) || name.ends_with(['/', '.', '-']) {
        return Some("must not start or end with '/', '.' or '-'");
    }
    None
}

/// The connection string's EntityPath as an error may show it: only when it is made of
/// queue-name characters and is not as long as a key (a key pasted into the wrong part, or
/// glued to it by a lost ';', has other characters or is 40 or more of the base64 alphabet).
fn shown_entity_path(path: &str) -> String {
    let name_characters = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
    if name_characters && path.len() < 40 {
        format!("{path:?}")
    } else {
        "(not shown: it may hold a key)".to_string()
    }
}

fn parse_producer(args: &Args, queue: Option<String>) -> Result<ProducerConfig, ConfigError> {
    let queue = require_queue(queue)?;
    if queue.ends_with(DEAD_LETTER_SUFFIX) {
        return Err(ConfigError::new(
            "AZURE_SERVICEBUS_QUEUE_NAME",
            format!("{queue:?} is a dead-letter queue: Service Bus takes no sends there (only the consumer reads it)"),
        ));
    }
    let message_count = parse_number("MESSAGE_COUNT", &args.message_count, DEFAULT_PRODUCER_COUNT)?;
    let base = args
        .message_body
        .clone()
        .unwrap_or_else(|| DEFAULT_MESSAGE_BODY.to_string());
    let body = match non_empty(&args.message_size) {
        Some(_) => {
            let size: u64 = parse_number("MESSAGE_SIZE", &args.message_size, 0)?;
            pad_body(&base, size)?
        }
        None => base,
    };
    Ok(ProducerConfig {
        queue,
        message_count,
        body,
    })
}

/// Pad `body` with spaces to `size` bytes.
pub fn pad_body(body: &str, size: u64) -> Result<String, ConfigError> {
    if size > MAX_MESSAGE_SIZE {
        return Err(ConfigError::new(
            "MESSAGE_SIZE",
            format!("{size} is larger than {MAX_MESSAGE_SIZE} bytes"),
        ));
    }
    let len = body.len() as u64;
    if size < len {
        return Err(ConfigError::new(
            "MESSAGE_SIZE",
            format!("{size} is smaller than MESSAGE_BODY ({len} bytes)"),
        ));
    }
    let mut padded = String::with_capacity(size as usize);
    padded.push_str(body);
    padded.extend(std::iter::repeat_n(' ', (size - len) as usize));
    Ok(padded)
}

fn parse_consumer(
    args: &Args,
    queue: Option<String>,
    notes: &mut Vec<String>,
) -> Result<ConsumerConfig, ConfigError> {
    let queue = require_queue(queue)?;
    let message_count: u64 = parse_number("MESSAGE_COUNT", &args.message_count, 0)?;
    let processing_delay =
        parse_duration_setting("PROCESSING_DELAY", &args.processing_delay, Duration::ZERO)?;
    let idle = parse_duration_setting(
        "CONSUMER_IDLE_TIMEOUT",
        &args.consumer_idle_timeout,
        Duration::from_secs(30),
    )?;
    if idle.is_zero() {
        return Err(ConfigError::new(
            "CONSUMER_IDLE_TIMEOUT",
            "must be more than 0",
        ));
    }
    let prefetch: u32 = parse_number("PREFETCH", &args.prefetch, 0)?;
    let max_processing_attempts: u32 =
        parse_number("MAX_PROCESSING_ATTEMPTS", &args.max_processing_attempts, 3)?;
    if max_processing_attempts == 0 {
        return Err(ConfigError::new(
            "MAX_PROCESSING_ATTEMPTS",
            "must be at least 1",
        ));
    }
    if message_count == 0 && non_empty(&args.consumer_idle_timeout).is_some() {
        notes.push(
            "CONSUMER_IDLE_TIMEOUT is ignored with MESSAGE_COUNT=0: a continuous worker waits for work"
                .to_string(),
        );
    }
    if message_count > 0 && u64::from(prefetch) > message_count {
        notes.push(format!(
            "PREFETCH {prefetch} is capped at MESSAGE_COUNT {message_count}: a Job never locks more than it takes"
        ));
    }
    Ok(ConsumerConfig {
        queue,
        message_count,
        processing_delay,
        // A continuous worker (MESSAGE_COUNT=0) waits for work however long it takes.
        idle_timeout: (message_count > 0).then_some(idle),
        prefetch,
        max_processing_attempts,
        processing_fail_match: args.processing_fail_match.clone().filter(|s| !s.is_empty()),
    })
}

fn parse_scaler(
    args: &Args,
    queue: Option<String>,
    namespace: &Namespace,
) -> Result<ScalerConfig, ConfigError> {
    let grpc_addr = parse_socket_addr(
        "SCALER_GRPC_ADDR",
        non_empty(&args.scaler_grpc_addr).unwrap_or("0.0.0.0:6000"),
    )?;
    let management_endpoint = match non_empty(&args.management_endpoint) {
        Some(value) => parse_management_endpoint(value)?,
        None => default_management_endpoint(namespace)?,
    };
    let cache_ttl = parse_duration_setting(
        "SCALER_CACHE_TTL",
        &args.scaler_cache_ttl,
        Duration::from_secs(5),
    )?;
    if cache_ttl.is_zero() {
        return Err(ConfigError::new("SCALER_CACHE_TTL", "must be more than 0"));
    }
    let max_staleness = parse_duration_setting(
        "SCALER_MAX_STALENESS",
        &args.scaler_max_staleness,
        Duration::from_secs(60),
    )?;
    let queues = match non_empty(&args.scaler_queues) {
        Some(list) => {
            let mut queues = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                validate_entity_name(name)
                    .map_err(|problem| ConfigError::new("SCALER_QUEUES", problem))?;
                queues.push(name.to_string());
            }
            queues
        }
        None => queue.into_iter().collect(),
    };
    let tls = parse_scaler_tls(args)?;
    Ok(ScalerConfig {
        grpc_addr,
        management_endpoint,
        cache_ttl,
        max_staleness,
        queues,
        tls,
    })
}

fn parse_management_endpoint(value: &str) -> Result<url::Url, ConfigError> {
    const SETTING: &str = "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT";
    let mut url = url::Url::parse(value)
        .map_err(|err| ConfigError::new(SETTING, format!("invalid URL {value:?}: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::new(
            SETTING,
            format!("{value:?} must be an http:// or https:// URL with a host"),
        ));
    }
    // A base URL: queue names are joined onto it.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn default_management_endpoint(namespace: &Namespace) -> Result<url::Url, ConfigError> {
    // Azure serves ATOM on 443 of the namespace host, whatever the AMQP port.
    let base = match namespace.transport {
        Transport::Tls => format!("https://{}/", namespace.host),
        // The emulator serves its management API over plain HTTP on 5300.
        Transport::Plain => format!("http://{}:5300/", namespace.host),
    };
    parse_management_endpoint(&base)
}

fn parse_scaler_tls(args: &Args) -> Result<Option<ScalerTlsConfig>, ConfigError> {
    let cert = non_empty(&args.scaler_tls_cert_file).map(PathBuf::from);
    let key = non_empty(&args.scaler_tls_key_file).map(PathBuf::from);
    let client_ca = non_empty(&args.scaler_tls_client_ca_file).map(PathBuf::from);
    match (cert, key) {
        (Some(cert_file), Some(key_file)) => {
            check_certificates("SCALER_TLS_CERT_FILE", &cert_file)?;
            check_private_key("SCALER_TLS_KEY_FILE", &key_file)?;
            if let Some(ca) = &client_ca {
                check_certificates("SCALER_TLS_CLIENT_CA_FILE", ca)?;
            }
            Ok(Some(ScalerTlsConfig {
                cert_file,
                key_file,
                client_ca_file: client_ca,
            }))
        }
        (None, None) if client_ca.is_some() => Err(ConfigError::new(
            "SCALER_TLS_CLIENT_CA_FILE",
            "needs SCALER_TLS_CERT_FILE and SCALER_TLS_KEY_FILE",
        )),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::new(
            "SCALER_TLS_KEY_FILE",
            "not set, but SCALER_TLS_CERT_FILE is",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            "SCALER_TLS_CERT_FILE",
            "not set, but SCALER_TLS_KEY_FILE is",
        )),
    }
}

fn parse_socket_addr(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::new(
            setting,
            format!("invalid address {value:?}: expected IP:PORT, e.g. 0.0.0.0:8080"),
        )
    })
}

fn parse_number<T>(
    setting: &'static str,
    value: &Option<String>,
    default: T,
) -> Result<T, ConfigError>
where
    T: FromStr,
{
    let Some(raw) = non_empty(value) else {
        return Ok(default);
    };
    if raw.starts_with('-') {
        return Err(ConfigError::new(
            setting,
            format!("invalid value {raw:?}: must not be negative"),
        ));
    }
    raw.parse().map_err(|_| {
        ConfigError::new(
            setting,
            format!("invalid value {raw:?}: expected a whole number"),
        )
    })
}

fn parse_duration_setting(
    setting: &'static str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match non_empty(value) {
        Some(raw) => parse_duration(raw).map_err(|problem| ConfigError::new(setting, problem)),
        None => Ok(default),
    }
}

/// Durations as `500ms`, `30s`, `2m`, `1h` (humantime; combinations like `1m30s` too).
/// A bare number is refused: its unit would be a guess.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    if raw.starts_with('-') {
        return Err(format!("invalid duration {raw:?}: must not be negative"));
    }
    if raw.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid duration {raw:?}: add a unit, e.g. {raw}s or {raw}ms"
        ));
    }
    let duration = humantime::parse_duration(raw)
        .map_err(|err| format!("invalid duration {raw:?}: {err} (examples: 500ms, 30s, 2m)"))?;
    // Durations are added to clock readings; a value near u64::MAX seconds would overflow
    // them (a panic at run time), and nothing here needs to wait longer than this.
    if duration > MAX_DURATION {
        return Err(format!(
            "invalid duration {raw:?}: longer than the maximum of 365 days"
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[&str]) -> Args {
        let mut argv = vec!["servicebusdemo"];
        argv.extend_from_slice(pairs);
        Args::try_parse_from(argv).expect("test arguments parse")
    }

    fn sas() -> &'static str {
        "--connection-string=Endpoint=sb://localhost:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true"
    }

    fn err(pairs: &[&str]) -> ConfigError {
        Config::from_args(args(pairs)).expect_err("configuration must be refused")
    }

    #[test]
    fn tutorial_producer_with_workload_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "x.y.z").expect("write token");
        let token_arg = format!("--federated-token-file={}", token.display());
        let config = Config::from_args(args(&[
            "producer",
            "--hostname=MyNs.servicebus.windows.net",
            "--queue-name=orders",
            "--message-count=100",
            "--client-id=cid",
            "--tenant-id=tid",
            &token_arg,
            "--authority-host=https://login.microsoftonline.com/",
        ]))
        .expect("valid");
        assert_eq!(config.common.namespace.host, "myns.servicebus.windows.net");
        assert_eq!(config.common.namespace.port, 5671);
        assert_eq!(config.common.namespace.transport, Transport::Tls);
        assert!(matches!(
            config.common.auth,
            AuthConfig::WorkloadIdentity { ref client_id, .. } if client_id == "cid"
        ));
        let ModeConfig::Producer(p) = config.mode else {
            panic!("producer expected")
        };
        assert_eq!(p.message_count, 100);
        assert_eq!(p.body, "Hello World!");
    }

    #[test]
    fn emulator_connection_string_means_plain_amqp() {
        let config =
            Config::from_args(args(&["consumer", sas(), "--queue-name=queue.1"])).expect("valid");
        assert_eq!(config.common.namespace.transport, Transport::Plain);
        assert_eq!(config.common.namespace.port, 5672);
        let ModeConfig::Consumer(c) = config.mode else {
            panic!("consumer expected")
        };
        assert_eq!(c.message_count, 0);
        assert_eq!(c.idle_timeout, None, "continuous worker never idles out");
    }

    #[test]
    fn emulator_without_port_uses_5672_and_azure_uses_5671() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true",
        )
        .expect("valid");
        assert_eq!(cs.namespace.port, 5672);
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=a+b/c==;EntityPath=q",
        )
        .expect("valid");
        assert_eq!(cs.namespace.port, 5671);
        assert_eq!(cs.namespace.transport, Transport::Tls);
        assert_eq!(cs.entity_path.as_deref(), Some("q"));
        assert_eq!(
            cs.auth,
            AuthConfig::SharedAccessKey(SharedAccessKey {
                key_name: "k".into(),
                key: "a+b/c==".into()
            })
        );
    }

    #[test]
    fn malformed_connection_strings_are_refused_without_echoing_the_key() {
        for bad in [
            "garbage",
            "Endpoint=http://x;SharedAccessKeyName=k;SharedAccessKey=v",
            "Endpoint=sb://x;SharedAccessKeyName=k",
            "SharedAccessKeyName=k;SharedAccessKey=v",
            "Endpoint=sb://x;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=maybe",
            "Endpoint=sb://x/path;SharedAccessKeyName=k;SharedAccessKey=v",
            "Endpoint=sb://x;SharedAccessKeyName=k;SharedAccessKey=v;Bogus=1",
        ] {
            let err = ConnectionString::parse(bad).expect_err(bad);
            assert_eq!(err.setting, "AZURE_SERVICEBUS_CONNECTION_STRING");
            assert!(err.problem.starts_with("malformed"), "{bad}: {err}");
            assert!(!err.to_string().contains("SharedAccessKey=v"), "{err}");
        }
    }

    #[test]
    fn bad_values_name_their_setting() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["producer", sas(), "--queue-name=q", "--message-count=abc"],
                "MESSAGE_COUNT",
            ),
            (
                &["producer", sas(), "--queue-name=q", "--message-count=-5"],
                "MESSAGE_COUNT",
            ),
            (&["producer", sas()], "AZURE_SERVICEBUS_QUEUE_NAME"),
            (
                &["producer", sas(), "--queue-name=bad name"],
                "AZURE_SERVICEBUS_QUEUE_NAME",
            ),
            (
                &[
                    "producer",
                    "--hostname=https://ns.servicebus.windows.net",
                    "--queue-name=q",
                ],
                "AZURE_SERVICEBUS_HOSTNAME",
            ),
            (&["producer", "--queue-name=q"], "AZURE_SERVICEBUS_HOSTNAME"),
            (
                &["producer", sas(), "--hostname=ns", "--queue-name=q"],
                "AZURE_SERVICEBUS_CONNECTION_STRING",
            ),
            (
                &["--operation-mode=sideways", sas(), "--queue-name=q"],
                "OPERATION_MODE",
            ),
            (&[sas(), "--queue-name=q"], "OPERATION_MODE"),
            (
                &[
                    "consumer",
                    sas(),
                    "--queue-name=q",
                    "--consumer-idle-timeout=30",
                ],
                "CONSUMER_IDLE_TIMEOUT",
            ),
            (
                &[
                    "consumer",
                    sas(),
                    "--queue-name=q",
                    "--processing-delay=soon",
                ],
                "PROCESSING_DELAY",
            ),
            (
                &["consumer", sas(), "--queue-name=q", "--prefetch=lots"],
                "PREFETCH",
            ),
            (
                &[
                    "producer",
                    sas(),
                    "--queue-name=q",
                    "--metrics-addr=localhost",
                ],
                "METRICS_ADDR",
            ),
            (
                &["producer", sas(), "--queue-name=q", "--log-format=xml"],
                "LOG_FORMAT",
            ),
            (
                &["producer", sas(), "--queue-name=q", "--log-filter=[[["],
                "RUST_LOG",
            ),
            (
                &["producer", sas(), "--queue-name=q", "--message-size=3"],
                "MESSAGE_SIZE",
            ),
            (
                &[
                    "producer",
                    "--hostname=ns.servicebus.windows.net",
                    "--queue-name=q",
                    "--federated-token-file=/nonexistent/token",
                    "--client-id=c",
                    "--tenant-id=t",
                ],
                "AZURE_FEDERATED_TOKEN_FILE",
            ),
            (
                &[
                    "producer",
                    "--hostname=ns.servicebus.windows.net",
                    "--queue-name=q",
                    "--federated-token-file=/nonexistent/token",
                    "--client-id=c",
                ],
                "AZURE_TENANT_ID",
            ),
            (
                &[
                    "producer",
                    "--hostname=ns.servicebus.windows.net",
                    "--queue-name=q",
                    "--authority-host=http://login",
                ],
                "AZURE_AUTHORITY_HOST",
            ),
            (
                &["scaler", sas(), "--scaler-grpc-addr=:6000"],
                "SCALER_GRPC_ADDR",
            ),
            (
                &["scaler", sas(), "--management-endpoint=ftp://x"],
                "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
            ),
            (
                &["scaler", sas(), "--scaler-tls-cert-file=/etc/hostname"],
                "SCALER_TLS_KEY_FILE",
            ),
            (
                &["scaler", sas(), "--scaler-cache-ttl=0s"],
                "SCALER_CACHE_TTL",
            ),
        ];
        for (argv, setting) in cases {
            let err = err(argv);
            assert_eq!(err.setting, *setting, "{argv:?} -> {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn settings_without_effect_are_noted() {
        let config = Config::from_args(args(&[
            "consumer",
            sas(),
            "--queue-name=q",
            "--message-count=0",
            "--consumer-idle-timeout=5s",
        ]))
        .expect("valid");
        assert_eq!(config.notes.len(), 1);
        assert!(config.notes[0].contains("CONSUMER_IDLE_TIMEOUT"));
        let config = Config::from_args(args(&[
            "consumer",
            sas(),
            "--queue-name=q",
            "--message-count=10",
            "--prefetch=50",
        ]))
        .expect("valid");
        assert!(config.notes[0].contains("PREFETCH"));
    }

    #[test]
    fn subcommand_and_env_mode_must_agree() {
        let err = err(&[
            "consumer",
            "--operation-mode=producer",
            sas(),
            "--queue-name=q",
        ]);
        assert_eq!(err.setting, "OPERATION_MODE");
        let ok = Config::from_args(args(&[
            "consumer",
            "--operation-mode=Consumer",
            sas(),
            "--queue-name=q",
        ]))
        .expect("same mode twice is fine");
        assert_eq!(ok.mode(), Mode::Consumer);
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn message_size_pads_the_body() {
        let body = pad_body("Hello World!", 20).expect("valid");
        assert_eq!(body.len(), 20);
        assert!(body.starts_with("Hello World!"));
        assert!(pad_body("Hello World!", MAX_MESSAGE_SIZE + 1).is_err());
    }

    #[test]
    fn hostname_accepts_host_port_for_local_brokers() {
        let ns = parse_hostname("localhost:5671").expect("valid");
        assert_eq!((ns.host.as_str(), ns.port), ("localhost", 5671));
        assert!(parse_hostname("localhost:notaport").is_err());
        assert!(parse_hostname("ns.servicebus.windows.net/queue").is_err());
    }

    #[test]
    fn dead_letter_sub_queue_is_a_valid_queue_name() {
        assert!(validate_entity_name("orders/$DeadLetterQueue").is_ok());
        assert!(validate_entity_name("orders/$other").is_err());
        assert!(validate_entity_name("/$DeadLetterQueue").is_err());
    }

    #[test]
    fn scaler_defaults() {
        let config = Config::from_args(args(&[
            "scaler",
            "--hostname=ns.servicebus.windows.net",
            "--queue-name=orders",
        ]))
        .expect("valid");
        let ModeConfig::Scaler(s) = config.mode else {
            panic!("scaler expected")
        };
        assert_eq!(
            s.grpc_addr,
            "0.0.0.0:6000".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            s.management_endpoint.as_str(),
            "https://ns.servicebus.windows.net/"
        );
        assert_eq!(s.cache_ttl, Duration::from_secs(5));
        assert_eq!(s.queues, vec!["orders".to_string()]);
        assert_eq!(s.tls, None);
        assert_eq!(config.common.metrics_addr.port(), 8080);
    }

    #[test]
    fn management_endpoint_becomes_a_base_url() {
        let url = parse_management_endpoint("https://localhost:5443/sb").expect("valid");
        assert_eq!(
            url.join("q1").expect("join").as_str(),
            "https://localhost:5443/sb/q1"
        );
    }

    #[test]
    fn signatures_do_not_appear_in_debug_output() {
        let config = Config::from_args(args(&[
            "producer",
            "--connection-string=Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=SECRET_SIG&se=1&skn=k",
            "--queue-name=q",
        ]))
        .expect("valid");
        assert!(!format!("{config:?}").contains("SECRET_SIG"));
    }

    fn scoped_sas(entity_path: &str) -> String {
        format!("{};EntityPath={entity_path}", sas())
    }

    fn queue_of(config: &Config) -> &str {
        match &config.mode {
            ModeConfig::Producer(p) => &p.queue,
            ModeConfig::Consumer(c) => &c.queue,
            ModeConfig::Scaler(_) => panic!("producer or consumer expected"),
        }
    }

    #[test]
    fn entity_path_is_the_default_queue() {
        let cs = scoped_sas("orders");
        for mode in ["producer", "consumer"] {
            let config = Config::from_args(args(&[mode, &cs])).expect("valid");
            assert_eq!(queue_of(&config), "orders", "{mode}");
        }
        let config = Config::from_args(args(&["scaler", &cs])).expect("valid");
        let ModeConfig::Scaler(s) = config.mode else {
            panic!("scaler expected")
        };
        assert_eq!(s.queues, vec!["orders".to_string()]);
    }

    #[test]
    fn queue_name_must_agree_with_entity_path() {
        let cs = scoped_sas("orders");
        for same in ["orders", "Orders", "orders/$DeadLetterQueue"] {
            let queue = format!("--queue-name={same}");
            let config = Config::from_args(args(&["consumer", &cs, &queue])).expect(same);
            assert_eq!(queue_of(&config), same);
        }
        for other in ["payments", "payments/$DeadLetterQueue", "orders2"] {
            let queue = format!("--queue-name={other}");
            let e = err(&["consumer", &cs, &queue]);
            assert_eq!(e.setting, "AZURE_SERVICEBUS_QUEUE_NAME", "{other}");
            assert!(e.problem.contains("EntityPath=\"orders\""), "{}", e.problem);
            assert!(!e.problem.contains("SAS_KEY_VALUE"), "{}", e.problem);
        }
    }

    #[test]
    fn invalid_entity_path_names_the_connection_string() {
        let e = err(&["producer", &scoped_sas("bad queue!")]);
        assert_eq!(e.setting, "AZURE_SERVICEBUS_CONNECTION_STRING");
        assert!(e.problem.contains("EntityPath"), "{}", e.problem);
        let e = err(&["producer", sas()]);
        assert_eq!(e.setting, "AZURE_SERVICEBUS_QUEUE_NAME");
    }

    #[test]
    fn args_debug_output_hides_the_connection_string() {
        let parsed = args(&["producer", sas(), "--queue-name=q"]);
        let debug = format!("{parsed:?}");
        assert!(!debug.contains("SAS_KEY_VALUE"), "{debug}");
        assert!(
            debug.contains("connection_string: Some(\"<redacted>\")"),
            "{debug}"
        );
        assert!(debug.contains("queue_name: Some(\"q\")"), "{debug}");
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let config =
            Config::from_args(args(&["producer", sas(), "--queue-name=q"])).expect("valid");
        assert!(!format!("{config:?}").contains("SAS_KEY_VALUE"));
    }
}

/// Property tests: the parsers never panic on any input, an error always names the setting
/// that was given the bad value, and every accepted configuration is safe to run with.
#[cfg(test)]
mod fuzz {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;

    /// A realistic key (44 base64 characters, as Azure issues them), marked so a leak is
    /// easy to spot.
    const KEY: &str = "S3cr3tK3yS3cr3tK3yS3cr3tK3yS3cr3tK3yS3cr3t0=";
    /// A short key, like the emulator's documented `SAS_KEY_VALUE`.
    const SHORT_KEY: &str = "Zq9Xk2Lp";

    /// Whether `text` holds any five characters of `key` in a row, in any letter case.
    fn shows_part_of(text: &str, key: &str) -> bool {
        let text = text.to_ascii_lowercase();
        let key = key.to_ascii_lowercase();
        (0..=key.len().saturating_sub(5)).any(|start| text.contains(&key[start..start + 5]))
    }

    type Setter = fn(&mut Args, String);

    /// Every setting a mutation can hit, with the field it sets.
    const SETTINGS: &[(&str, Setter)] = &[
        ("OPERATION_MODE", |a, v| a.operation_mode = Some(v)),
        ("MESSAGE_COUNT", |a, v| a.message_count = Some(v)),
        ("AZURE_SERVICEBUS_QUEUE_NAME", |a, v| a.queue_name = Some(v)),
        ("AZURE_SERVICEBUS_HOSTNAME", |a, v| a.hostname = Some(v)),
        ("AZURE_SERVICEBUS_CONNECTION_STRING", |a, v| {
            a.connection_string = Some(v)
        }),
        ("AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT", |a, v| {
            a.management_endpoint = Some(v)
        }),
        ("AZURE_FEDERATED_TOKEN_FILE", |a, v| {
            a.federated_token_file = Some(v)
        }),
        ("AZURE_AUTHORITY_HOST", |a, v| a.authority_host = Some(v)),
        ("MESSAGE_SIZE", |a, v| a.message_size = Some(v)),
        ("PROCESSING_DELAY", |a, v| a.processing_delay = Some(v)),
        ("CONSUMER_IDLE_TIMEOUT", |a, v| {
            a.consumer_idle_timeout = Some(v)
        }),
        ("PREFETCH", |a, v| a.prefetch = Some(v)),
        ("MAX_PROCESSING_ATTEMPTS", |a, v| {
            a.max_processing_attempts = Some(v)
        }),
        ("OPERATION_TIMEOUT", |a, v| a.operation_timeout = Some(v)),
        ("RETRY_MAX_ATTEMPTS", |a, v| a.retry_max_attempts = Some(v)),
        ("RETRY_BASE_DELAY", |a, v| a.retry_base_delay = Some(v)),
        ("RETRY_MAX_DELAY", |a, v| a.retry_max_delay = Some(v)),
        ("METRICS_ADDR", |a, v| a.metrics_addr = Some(v)),
        ("LOG_FORMAT", |a, v| a.log_format = Some(v)),
        ("RUST_LOG", |a, v| a.log_filter = Some(v)),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", |a, v| {
            a.otlp_endpoint = Some(v)
        }),
        ("SCALER_GRPC_ADDR", |a, v| a.scaler_grpc_addr = Some(v)),
        ("SCALER_CACHE_TTL", |a, v| a.scaler_cache_ttl = Some(v)),
        ("SCALER_MAX_STALENESS", |a, v| {
            a.scaler_max_staleness = Some(v)
        }),
        ("SCALER_QUEUES", |a, v| a.scaler_queues = Some(v)),
        ("SCALER_TLS_CERT_FILE", |a, v| {
            a.scaler_tls_cert_file = Some(v)
        }),
    ];

    /// A valid starting point for each mode, with a SAS connection string or a host name.
    fn base(mode: Mode, with_hostname: bool) -> Args {
        let mut args = Args::try_parse_from(["servicebusdemo"]).expect("no arguments parse");
        args.operation_mode = Some(mode.as_str().to_string());
        args.queue_name = Some("orders".to_string());
        if with_hostname {
            args.hostname = Some("ns.servicebus.windows.net".to_string());
        } else {
            args.connection_string = Some(format!(
                "Endpoint=sb://localhost:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
            ));
        }
        args
    }

    /// Values that look like what a setting expects, near misses, and anything at all.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "-?[0-9]{1,25}",
            // Whole u64 ranges: most of these overflow a clock reading.
            any::<u64>().prop_map(|secs| format!("{secs}s")),
            any::<u64>().prop_map(|ms| format!("{ms}ms")),
            "-?[0-9]{1,22}(ns|us|ms|s|m|h|d|w|M|y|years|x| s)",
            "[0-9]{1,3}(\\.[0-9]{1,3}){0,4}(:[0-9]{0,6})?",
            "\\[?[0-9a-f:]{0,12}\\]?(:[0-9]{1,6})?",
            "(https?|sb|amqps?|ftp)?(://)?[a-zA-Z0-9.:_-]{0,20}(/[a-z/$]{0,10})?",
            "(producer|consumer|scaler|PRODUCER| producer |json|text|info|[a-z.]{0,12})",
            "[a-zA-Z0-9.=,;_/$-]{0,40}",
        ]
    }

    /// Every duration an accepted configuration holds.
    fn durations(config: &Config) -> Vec<Duration> {
        let common = &config.common;
        let mut all = vec![
            common.operation_timeout,
            common.retry.base_delay,
            common.retry.max_delay,
        ];
        match &config.mode {
            ModeConfig::Producer(_) => {}
            ModeConfig::Consumer(c) => {
                all.push(c.processing_delay);
                all.extend(c.idle_timeout);
            }
            ModeConfig::Scaler(s) => {
                all.push(s.cache_ttl);
                all.push(s.max_staleness);
            }
        }
        all
    }

    proptest! {
        // PROPTEST_CASES runs a longer search.
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
        ))]

        /// One setting gets an arbitrary value: the result is a configuration that is safe to
        /// run with, or one error line that names that setting.
        #[test]
        fn one_bad_setting_is_named_and_nothing_panics(
            mode in prop_oneof![Just(Mode::Producer), Just(Mode::Consumer), Just(Mode::Scaler)],
            with_hostname in any::<bool>(),
            index in 0..SETTINGS.len(),
            raw in value(),
        ) {
            let (setting, set) = SETTINGS[index];
            let mut args = base(mode, with_hostname);
            set(&mut args, raw.clone());
            match Config::from_args(args) {
                Ok(config) => {
                    let now = Instant::now();
                    for duration in durations(&config) {
                        prop_assert!(duration <= MAX_DURATION, "{setting}={raw:?}: {duration:?}");
                        prop_assert!(now.checked_add(duration).is_some());
                    }
                    if let ModeConfig::Producer(p) = &config.mode {
                        prop_assert!(p.body.len() as u64 <= MAX_MESSAGE_SIZE);
                    }
                }
                Err(err) => {
                    let line = err.to_string();
                    prop_assert!(
                        line.contains(setting),
                        "{setting}={raw:?} gave an error about something else: {line}"
                    );
                    prop_assert!(!line.contains('\n'), "one line: {line:?}");
                    prop_assert!(!line.contains(KEY), "the key leaked: {line}");
                }
            }
        }

        /// Arbitrary text as a connection string: parsed or refused, never a panic, and the
        /// error names the setting.
        #[test]
        fn connection_string_parser_never_panics(raw in any::<String>()) {
            match ConnectionString::parse(&raw) {
                Ok(parsed) => prop_assert!(!parsed.namespace.host.is_empty()),
                Err(err) => {
                    prop_assert_eq!(err.setting, "AZURE_SERVICEBUS_CONNECTION_STRING");
                    prop_assert!(!err.to_string().contains('\n'));
                }
            }
        }

        /// Connection strings assembled from real and mangled parts, in any order, with a
        /// real-looking key: whatever is wrong, the key never appears in the error.
        #[test]
        fn connection_string_errors_never_show_the_key(
            parts in proptest::collection::vec(
                prop_oneof![
                    "Endpoint=(sb|amqp|amqps|https)://[a-z0-9.-]{0,15}(:[0-9]{1,6})?/?[a-z]{0,3}",
                    Just("SharedAccessKeyName=RootManageSharedAccessKey".to_string()),
                    Just(format!("SharedAccessKey={KEY}")),
                    Just(format!("SharedAccessKey {KEY}")),
                    Just(format!("SharedAccessKey:{KEY}")),
                    Just(format!("SharedAccessKey={SHORT_KEY}")),
                    Just(format!("SharedAccessKey {SHORT_KEY}")),
                    Just(format!("SharedAccessKey-{SHORT_KEY}")),
                    Just(format!("SharedAccessSignature=SharedAccessSignature sr=x&sig={KEY}")),
                    // A key whose name was lost, or glued to the part before by a lost ';'.
                    Just(KEY.to_string()),
                    Just(SHORT_KEY.to_string()),
                    Just(format!("Endpoint=sb://localhost/SharedAccessKey={KEY}")),
                    Just(format!("Endpoint=sb://localhost SharedAccessKey={KEY}")),
                    Just(format!("Endpoint=sb://localhostSharedAccessKey={KEY}")),
                    Just(format!("Endpoint=sb://localhost/SharedAccessKey={SHORT_KEY}")),
                    Just(format!("UseDevelopmentEmulator=true SharedAccessKey={KEY}")),
                    Just(format!("UseDevelopmentEmulator=true{SHORT_KEY}")),
                    Just(format!("EntityPath=q SharedAccessKey={KEY}")),
                    Just(format!("EntityPath={KEY}")),
                    Just(format!("EntityPath={}", KEY.trim_end_matches('='))),
                    "UseDevelopmentEmulator=(true|false|TRUE|yes|)",
                    "EntityPath=[a-z]{0,8}",
                    "[A-Za-z]{0,12}(=[^;]{0,10})?",
                ],
                0..7,
            ),
            separator in prop_oneof![Just(";"), Just(" ; "), Just(";;")],
            // Often a valid start, so that the later parts reach the checks after parsing.
            start in prop_oneof![
                Just(""),
                Just("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=k;"),
            ],
            queue_name in prop_oneof![Just(None), Just(Some("orders"))],
        ) {
            let raw = format!("{start}{}", parts.join(separator));
            if let Err(err) = ConnectionString::parse(&raw) {
                prop_assert_eq!(err.setting, "AZURE_SERVICEBUS_CONNECTION_STRING");
                let shown = err.to_string();
                for key in [KEY, SHORT_KEY] {
                    prop_assert!(!shows_part_of(&shown, key), "{raw:?}: {shown}");
                }
            }
            // The parsed parts are checked further (EntityPath against the queue name) by
            // the whole configuration: its errors must not show the key either.
            let mut args = base(Mode::Producer, false);
            args.connection_string = Some(raw.clone());
            args.queue_name = queue_name.map(str::to_string);
            if let Err(err) = Config::from_args(args) {
                let shown = err.to_string();
                for key in [KEY, SHORT_KEY] {
                    prop_assert!(!shows_part_of(&shown, key), "{raw:?}: {shown}");
                }
            }
        }

        /// Durations: parsed or refused with a reason, never a panic; accepted ones fit a
        /// clock reading.
        #[test]
        fn duration_parser_never_panics(raw in value()) {
            if let Ok(duration) = parse_duration(&raw) {
                prop_assert!(duration <= MAX_DURATION);
                prop_assert!(Instant::now().checked_add(duration).is_some());
            }
        }
    }
}
