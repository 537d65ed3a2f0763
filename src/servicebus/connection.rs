//! One AMQP connection with the session for entity links and its `$cbs` client.
//!
//! TLS is opened here with tokio-rustls and roots from the platform store
//! (`rustls-native-certs`, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`), then handed to
//! fe2o3 as a plain stream: fe2o3's own TLS feature pins the webpki roots, which would refuse
//! a corporate or local CA. Service Bus speaks TLS first (no AMQP TLS header), then SASL
//! ANONYMOUS, then AMQP; authorisation happens afterwards through `$cbs`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Session};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::cbs::Cbs;
use super::coalesce::CoalescingStream;
use super::{with_timeout, ServiceBusError};
use crate::auth::Credentials;
use crate::config::{Namespace, Transport};

/// Largest frame we accept; Service Bus uses 256 KiB frames on its side.
const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Idle timeout we announce; fe2o3 sends heartbeats at half the peer's value.
const IDLE_TIMEOUT_MS: u32 = 120_000;

/// An open connection, its session and the `$cbs` client that authorises entities on it.
pub struct AmqpConnection {
    connection: ConnectionHandle<()>,
    pub(crate) session: SessionHandle<()>,
    pub(crate) cbs: Cbs,
    pub(crate) namespace: Namespace,
    pub(crate) timeout: Duration,
}

impl std::fmt::Debug for AmqpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConnection")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl AmqpConnection {
    /// Connect, begin a session, attach `$cbs` (on a session of its own). Every step is
    /// bounded by `timeout`.
    pub async fn open(
        namespace: &Namespace,
        credentials: Arc<Credentials>,
        timeout: Duration,
    ) -> Result<Self, ServiceBusError> {
        let mut connection = with_timeout("connect", timeout, connect(namespace)).await?;
        let session = with_timeout("begin session", timeout, async {
            Session::begin(&mut connection)
                .await
                .map_err(|err| ServiceBusError::Disconnected(format!("begin session: {err}")))
        })
        .await?;
        let cbs = Cbs::attach(&mut connection, credentials, timeout).await?;
        tracing::debug!(host = %namespace.host, port = namespace.port, "connected");
        Ok(Self {
            connection,
            session,
            cbs,
            namespace: namespace.clone(),
            timeout,
        })
    }

    /// Authorise `entity` (a queue path) on this connection and keep it authorised.
    pub async fn authorize(&mut self, entity: &str) -> Result<(), ServiceBusError> {
        let audience = self.namespace.audience(entity);
        self.cbs.authorize(&audience, self.timeout).await
    }

    /// Close politely; errors are only logged (the process is leaving anyway).
    pub async fn close(mut self) {
        self.cbs.stop();
        if let Err(err) = self.session.end().await {
            tracing::debug!(error = %err, "session end");
        }
        if let Err(err) = self.connection.close().await {
            tracing::debug!(error = %err, "connection close");
        }
    }
}

async fn connect(namespace: &Namespace) -> Result<ConnectionHandle<()>, ServiceBusError> {
    let addr = namespace.authority();
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|err| ServiceBusError::Disconnected(format!("connect to {addr}: {err}")))?;
    // Frames are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let container_id = format!("servicebusdemo-{}", uuid::Uuid::new_v4());
    let builder = Connection::builder()
        .container_id(container_id)
        .hostname(namespace.host.as_str())
        .sasl_profile(SaslProfile::Anonymous)
        .max_frame_size(MAX_FRAME_SIZE)
        .idle_time_out(IDLE_TIMEOUT_MS)
        .scheme("amqp");
    // Coalesced outside TLS, so that frames sent together also share TLS records.
    let opened = match namespace.transport {
        Transport::Plain => builder.open_with_stream(CoalescingStream::new(tcp)).await,
        Transport::Tls => {
            let tls = tls_handshake(&namespace.host, tcp).await?;
            builder.open_with_stream(CoalescingStream::new(tls)).await
        }
    };
    opened.map_err(|err| open_error(&addr, err))
}

fn open_error(addr: &str, err: OpenError) -> ServiceBusError {
    match err {
        OpenError::Io(io) => ServiceBusError::Disconnected(format!("open {addr}: {io}")),
        OpenError::TransportError(transport) => {
            ServiceBusError::Disconnected(format!("open {addr}: {transport}"))
        }
        OpenError::SaslError { code, .. } => ServiceBusError::Unauthorized(format!(
            "open {addr}: SASL negotiation failed ({code:?})"
        )),
        other => ServiceBusError::Protocol(format!("open {addr}: {other}")),
    }
}

async fn tls_handshake(
    host: &str,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ServiceBusError> {
    let config = tls_config()?;
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|err| ServiceBusError::Tls(format!("invalid server name {host:?}: {err}")))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    connector.connect(server_name, tcp).await.map_err(|err| {
        // An I/O error wrapping a rustls error is a certificate problem, not a network one.
        let is_tls = err
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if is_tls {
            ServiceBusError::Tls(format!(
                "handshake with {host}: {err} (is the CA in the system store or SSL_CERT_FILE?)"
            ))
        } else {
            ServiceBusError::Disconnected(format!("TLS handshake with {host}: {err}"))
        }
    })
}

/// The client TLS configuration, built once: reading the certificate store is not free.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, ServiceBusError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(build_tls_config)
        .clone()
        .map_err(ServiceBusError::Tls)
}

fn build_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let loaded = rustls_native_certs::load_native_certs();
    for err in &loaded.errors {
        tracing::warn!(error = %err, "could not load some trusted certificates");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "unparsable trusted certificates ignored");
    }
    if added == 0 {
        return Err(
            "no trusted root certificates found (system store empty and SSL_CERT_FILE unset)"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS configuration: {err}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
