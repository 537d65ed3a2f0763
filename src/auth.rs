//! Where tokens come from: SAS signed from a connection string's key, or Entra tokens from
//! workload identity, managed identity or developer tools (Azure CLI, azd).
//!
//! The same [`Credentials`] serve the AMQP `$cbs` put-token and the scaler's management
//! (ATOM) HTTP requests: [`AccessToken::authorization_header`] and
//! [`AccessToken::cbs_token_type`] say how to present a token on each.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::credentials::{TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientMethodOptions, ClientOptions, RetryOptions};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use crate::config::{AuthConfig, SharedAccessKey};
use crate::telemetry::{error_chain, one_line, Metrics, RequestOutcome};

/// The Entra scope of every Service Bus data-plane and management call.
pub const SERVICE_BUS_SCOPE: &str = "https://servicebus.azure.net/.default";
/// Entra's public-cloud authority host, used when AZURE_AUTHORITY_HOST is not set.
const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";

/// Lifetime of the SAS tokens we sign (what Microsoft's SDKs use).
pub const SAS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Characters left as they are by URL encoding (RFC 3986 unreserved), as `quote_plus` does.
const URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The identity provider said no: wrong key, no federated credential, expired assertion.
    /// Retrying will not help.
    #[error("authentication refused by {credential}: {message}")]
    Refused {
        credential: &'static str,
        message: String,
    },
    /// Could not reach the identity provider or read the token file; may work on retry.
    #[error("could not get a token from {credential}: {message}")]
    Unavailable {
        credential: &'static str,
        message: String,
    },
    /// A fixed SAS from the connection string has expired.
    #[error("the SharedAccessSignature in AZURE_SERVICEBUS_CONNECTION_STRING has expired")]
    SignatureExpired,
    #[error("cannot build the {credential} credential: {message}")]
    Setup {
        credential: &'static str,
        message: String,
    },
}

impl AuthError {
    pub fn is_transient(&self) -> bool {
        matches!(self, AuthError::Unavailable { .. })
    }
}

/// How a token is presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// `SharedAccessSignature sr=..&sig=..&se=..&skn=..`
    SharedAccessSignature,
    /// An Entra JWT.
    Bearer,
}

/// A token and when it stops being valid. `Debug` never shows the token.
#[derive(Clone)]
pub struct AccessToken {
    secret: String,
    pub expires_at: SystemTime,
    pub kind: TokenKind,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("kind", &self.kind)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    /// The raw token, for `$cbs` put-token bodies.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Value of the HTTP `Authorization` header.
    pub fn authorization_header(&self) -> String {
        match self.kind {
            TokenKind::SharedAccessSignature => self.secret.clone(),
            TokenKind::Bearer => format!("Bearer {}", self.secret),
        }
    }

    /// The `type` of a `$cbs` put-token request.
    pub fn cbs_token_type(&self) -> &'static str {
        match self.kind {
            TokenKind::SharedAccessSignature => "servicebus.windows.net:sastoken",
            TokenKind::Bearer => "jwt",
        }
    }

    /// Time left until expiry (zero when already expired).
    pub fn remaining(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

/// When to refresh a token that is valid for `lifetime` from now: five minutes before expiry
/// for long-lived tokens, at three quarters of the lifetime for short ones.
pub fn refresh_after(lifetime: Duration) -> Duration {
    const MARGIN: Duration = Duration::from_secs(300);
    if lifetime > MARGIN * 2 {
        lifetime - MARGIN
    } else {
        lifetime * 3 / 4
    }
}

/// Sign a SAS token for `resource` (e.g. `sb://ns.servicebus.windows.net/queue`), valid until
/// `expiry` (seconds since the Unix epoch).
pub fn sign_sas(key: &SharedAccessKey, resource: &str, expiry: u64) -> String {
    let encoded_resource = utf8_percent_encode(resource, URL_ENCODE).to_string();
    let string_to_sign = format!("{encoded_resource}\n{expiry}");
    // HMAC accepts keys of any length; the error arm cannot happen.
    let signature = match Hmac::<Sha256>::new_from_slice(key.key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(string_to_sign.as_bytes());
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    };
    format!(
        "SharedAccessSignature sr={}&sig={}&se={}&skn={}",
        encoded_resource,
        utf8_percent_encode(&signature, URL_ENCODE),
        expiry,
        utf8_percent_encode(&key.key_name, URL_ENCODE),
    )
}

/// The `se=` of a ready-made SAS token.
fn sas_expiry(token: &str) -> Option<SystemTime> {
    let fields = token.strip_prefix("SharedAccessSignature ")?;
    fields
        .split('&')
        .find_map(|kv| kv.strip_prefix("se="))
        .and_then(|se| se.parse::<u64>().ok())
        .map(|se| UNIX_EPOCH + Duration::from_secs(se))
}

/// A client assertion read from the projected service-account token file on every request:
/// the kubelet rotates the file, and a cached copy would eventually be expired.
#[derive(Debug)]
struct FederatedTokenFile(PathBuf);

#[async_trait::async_trait]
impl ClientAssertion for FederatedTokenFile {
    async fn secret(
        &self,
        _options: Option<ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        let token = tokio::fs::read_to_string(&self.0).await.map_err(|err| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Io,
                format!("cannot read {}: {err}", self.0.display()),
            )
        })?;
        Ok(token.trim().to_string())
    }
}

/// One Entra credential with the name we log.
struct NamedCredential {
    name: &'static str,
    credential: Arc<dyn TokenCredential>,
    /// Where its tokens come from and the setting that says so, added to an error when the
    /// provider could not be reached.
    provider: Option<String>,
}

/// Entra credentials tried in order; the first that gives a token is kept.
struct EntraChain {
    candidates: Vec<NamedCredential>,
    /// Index of the kept candidate. Only read and set, never held across a token request:
    /// a hung token endpoint must not queue every other caller behind it.
    chosen: OnceLock<usize>,
}

enum Source {
    Key(SharedAccessKey),
    Fixed {
        token: String,
        expires_at: SystemTime,
    },
    Entra(EntraChain),
}

/// The process's token source.
pub struct Credentials {
    source: Source,
    metrics: Option<Arc<Metrics>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("kind", &self.describe())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Build the token source for `config`. Logs which one was chosen.
    pub fn new(config: &AuthConfig, metrics: Option<Arc<Metrics>>) -> Result<Self, AuthError> {
        let source = match config {
            AuthConfig::SharedAccessKey(key) => Source::Key(key.clone()),
            AuthConfig::SharedAccessSignature(token) => Source::Fixed {
                token: token.clone(),
                // A signature without `se=` is treated as valid for an hour and refreshed
                // (re-presented) on that schedule.
                expires_at: sas_expiry(token)
                    .unwrap_or_else(|| SystemTime::now() + SAS_TOKEN_LIFETIME),
            },
            AuthConfig::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
                authority_host,
            } => Source::Entra(EntraChain::new(vec![workload_identity(
                tenant_id,
                client_id,
                token_file,
                authority_host.as_deref(),
            )?])),
            AuthConfig::Ambient { client_id } => {
                Source::Entra(EntraChain::new(ambient(client_id.as_deref())?))
            }
        };
        let credentials = Self { source, metrics };
        tracing::info!(credential = credentials.describe(), "credential chosen");
        Ok(credentials)
    }

    /// Which kind of credential this is, for logs.
    pub fn describe(&self) -> &'static str {
        match &self.source {
            Source::Key(_) => "shared access key (connection string)",
            Source::Fixed { .. } => "shared access signature (connection string)",
            Source::Entra(chain) if chain.candidates.len() == 1 => chain.candidates[0].name,
            Source::Entra(_) => "managed identity, then developer tools",
        }
    }

    /// A token for `resource` (the entity URI, e.g. `sb://host/queue`). SAS tokens are
    /// scoped to it; Entra tokens are for the Service Bus scope and fit every entity.
    pub async fn token(&self, resource: &str) -> Result<AccessToken, AuthError> {
        let result = match &self.source {
            Source::Key(key) => {
                let expires_at = SystemTime::now() + SAS_TOKEN_LIFETIME;
                let expiry = expires_at
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                Ok(AccessToken {
                    secret: sign_sas(key, resource, expiry),
                    expires_at,
                    kind: TokenKind::SharedAccessSignature,
                })
            }
            Source::Fixed { token, expires_at } => {
                if *expires_at <= SystemTime::now() {
                    Err(AuthError::SignatureExpired)
                } else {
                    Ok(AccessToken {
                        secret: token.clone(),
                        expires_at: *expires_at,
                        kind: TokenKind::SharedAccessSignature,
                    })
                }
            }
            Source::Entra(chain) => chain.token().await,
        };
        if let (Some(metrics), Source::Entra(_)) = (&self.metrics, &self.source) {
            metrics.token_request(match &result {
                Ok(_) => RequestOutcome::Success,
                Err(AuthError::Refused { .. }) => RequestOutcome::Unauthorized,
                Err(_) => RequestOutcome::Error,
            });
        }
        result
    }
}

/// The scaler's management (ATOM) requests use the same credentials as the AMQP side.
#[async_trait::async_trait]
impl crate::servicebus::admin::Authorizer for Credentials {
    async fn authorization(
        &self,
        resource_uri: &str,
    ) -> Result<String, crate::servicebus::admin::CredentialError> {
        Ok(self.token(resource_uri).await?.authorization_header())
    }
}

impl EntraChain {
    fn new(candidates: Vec<NamedCredential>) -> Self {
        Self {
            candidates,
            chosen: OnceLock::new(),
        }
    }

    async fn token(&self) -> Result<AccessToken, AuthError> {
        if let Some(&index) = self.chosen.get() {
            return get_token(&self.candidates[index]).await;
        }
        if let [only] = self.candidates.as_slice() {
            let token = get_token(only).await?;
            let _ = self.chosen.set(0);
            return Ok(token);
        }
        let mut failures = Vec::new();
        for (index, candidate) in self.candidates.iter().enumerate() {
            match get_token(candidate).await {
                Ok(token) => {
                    // Concurrent first callers may all probe; the first to succeed decides.
                    if self.chosen.set(index).is_ok() {
                        tracing::info!(credential = candidate.name, "credential chosen");
                    }
                    return Ok(token);
                }
                Err(err) => {
                    tracing::debug!(credential = candidate.name, error = %err, "credential unavailable");
                    failures.push(err.to_string());
                }
            }
        }
        // Nothing in the environment provides an identity: retrying will not change that.
        Err(AuthError::Refused {
            credential: "managed identity, then developer tools",
            message: format!(
                "no identity available (set AZURE_SERVICEBUS_CONNECTION_STRING, or run with workload identity): {}",
                failures.join("; ")
            ),
        })
    }
}

async fn get_token(candidate: &NamedCredential) -> Result<AccessToken, AuthError> {
    let options = TokenRequestOptions::default();
    match candidate
        .credential
        .get_token(&[SERVICE_BUS_SCOPE], Some(options))
        .await
    {
        Ok(token) => {
            let expires_at = u64::try_from(token.expires_on.unix_timestamp())
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap_or(UNIX_EPOCH);
            Ok(AccessToken {
                secret: token.token.secret().to_string(),
                expires_at,
                kind: TokenKind::Bearer,
            })
        }
        Err(err) => Err(classify(candidate, err)),
    }
}

/// An answer from the identity provider (4xx) is final; anything else may pass.
fn classify(candidate: &NamedCredential, err: azure_core::Error) -> AuthError {
    let credential = candidate.name;
    let status = find_http_status(&err);
    match status {
        Some(code) if (400..500).contains(&code) && code != 429 && code != 408 => {
            AuthError::Refused {
                credential,
                message: one_line(&err.to_string()),
            }
        }
        // Unreachable: the transport's own reason (connection refused, DNS) is further down
        // the error's sources, and where the provider was looked for is what to check.
        _ => AuthError::Unavailable {
            credential,
            message: match &candidate.provider {
                Some(provider) => format!("{} ({provider})", error_chain(&err)),
                None => error_chain(&err),
            },
        },
    }
}

fn find_http_status(err: &azure_core::Error) -> Option<u16> {
    if let azure_core::error::ErrorKind::HttpResponse { status, .. } = err.kind() {
        return Some(u16::from(*status));
    }
    // Credentials wrap the HTTP error in a Credential error; look one level down.
    let inner = std::error::Error::source(err)?;
    let inner = inner.downcast_ref::<azure_core::Error>()?;
    match inner.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, .. } => Some(u16::from(*status)),
        _ => None,
    }
}

fn client_options(authority_host: Option<&str>) -> ClientOptions {
    let mut options = ClientOptions {
        // Failed token requests are retried by our policy (RETRY_*), around the whole
        // exchange; the SDK's own retries inside each attempt would stretch an unreachable
        // token endpoint into minutes of silence before the first error is seen.
        retry: RetryOptions::none(),
        ..ClientOptions::default()
    };
    if let Some(host) = authority_host {
        let mut custom = azure_core::cloud::CustomConfiguration::default();
        custom.authority_host = host.to_string();
        options.cloud = Some(Arc::new(custom.into()));
    }
    options
}

fn workload_identity(
    tenant_id: &str,
    client_id: &str,
    token_file: &std::path::Path,
    authority_host: Option<&str>,
) -> Result<NamedCredential, AuthError> {
    let credential = ClientAssertionCredential::new(
        tenant_id.to_string(),
        client_id.to_string(),
        FederatedTokenFile(token_file.to_path_buf()),
        Some(ClientAssertionCredentialOptions {
            client_options: client_options(authority_host),
        }),
    )
    .map_err(|err| AuthError::Setup {
        credential: "workload identity",
        message: one_line(&err.to_string()),
    })?;
    let provider = match authority_host {
        Some(host) => format!("authority host {host} from AZURE_AUTHORITY_HOST"),
        None => format!("authority host {DEFAULT_AUTHORITY_HOST}: AZURE_AUTHORITY_HOST is not set"),
    };
    Ok(NamedCredential {
        name: "workload identity (federated token file)",
        credential,
        provider: Some(provider),
    })
}

fn ambient(client_id: Option<&str>) -> Result<Vec<NamedCredential>, AuthError> {
    let managed = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(|id| UserAssignedId::ClientId(id.to_string())),
        ..Default::default()
    }))
    .map_err(|err| AuthError::Setup {
        credential: "managed identity",
        message: one_line(&err.to_string()),
    })?;
    let developer = DeveloperToolsCredential::new(None).map_err(|err| AuthError::Setup {
        credential: "developer tools",
        message: one_line(&err.to_string()),
    })?;
    Ok(vec![
        NamedCredential {
            name: "managed identity",
            credential: managed,
            provider: None,
        },
        NamedCredential {
            name: "developer tools (Azure CLI, azd)",
            credential: developer,
            provider: None,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SharedAccessKey {
        SharedAccessKey {
            key_name: "RootManageSharedAccessKey".into(),
            key: "SAS_KEY_VALUE".into(),
        }
    }

    /// Vector computed independently with Python's hmac/hashlib/base64/urllib.parse.quote_plus,
    /// the way azure-servicebus signs: quote_plus(uri) + "\n" + expiry.
    #[test]
    fn sas_signature_matches_reference_vector() {
        let token = sign_sas(&key(), "sb://localhost/queue.1", 1_700_000_000);
        assert_eq!(
            token,
            "SharedAccessSignature sr=sb%3A%2F%2Flocalhost%2Fqueue.1&sig=kVTHdaUjTWZZunyrEZsHF8WL7nEpir93aXQ1XkVu79k%3D&se=1700000000&skn=RootManageSharedAccessKey"
        );
    }

    #[test]
    fn fixed_signature_expiry_is_read_from_se() {
        let token = sign_sas(&key(), "sb://h/q", 1_800_000_000);
        assert_eq!(
            sas_expiry(&token),
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        assert_eq!(sas_expiry("Bearer abc"), None);
    }

    #[tokio::test]
    async fn sas_tokens_are_scoped_and_presented_as_sas() {
        let credentials =
            Credentials::new(&AuthConfig::SharedAccessKey(key()), None).expect("credentials");
        let token = credentials.token("sb://h/q").await.expect("token");
        assert_eq!(token.kind, TokenKind::SharedAccessSignature);
        assert!(token.secret().contains("sr=sb%3A%2F%2Fh%2Fq&"));
        assert_eq!(token.cbs_token_type(), "servicebus.windows.net:sastoken");
        assert!(token
            .authorization_header()
            .starts_with("SharedAccessSignature "));
        assert!(token.remaining() > Duration::from_secs(3500));
        assert!(!format!("{token:?}").contains("sig="));
    }

    #[tokio::test]
    async fn expired_fixed_signature_is_refused() {
        let expired = sign_sas(&key(), "sb://h/q", 1_000);
        let credentials = Credentials::new(&AuthConfig::SharedAccessSignature(expired), None)
            .expect("credentials");
        assert!(matches!(
            credentials.token("sb://h/q").await,
            Err(AuthError::SignatureExpired)
        ));
    }

    #[test]
    fn refresh_happens_before_expiry() {
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3300)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(60)),
            Duration::from_secs(45)
        );
        assert!(refresh_after(Duration::from_secs(1)) < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn federated_token_file_is_read_on_every_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").expect("write");
        let assertion = FederatedTokenFile(path.clone());
        assert_eq!(assertion.secret(None).await.expect("read"), "first");
        std::fs::write(&path, "second").expect("rewrite");
        assert_eq!(assertion.secret(None).await.expect("read"), "second");
        std::fs::remove_file(&path).expect("remove");
        assert!(assertion.secret(None).await.is_err());
    }
    /// A token endpoint that answers only once `barrier` callers are inside it at once.
    #[derive(Debug)]
    struct GatedCredential {
        barrier: tokio::sync::Barrier,
    }

    #[async_trait::async_trait]
    impl TokenCredential for GatedCredential {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            self.barrier.wait().await;
            Ok(azure_core::credentials::AccessToken::new(
                "entra-token",
                azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
            ))
        }
    }

    fn gated_chain() -> EntraChain {
        EntraChain::new(vec![NamedCredential {
            name: "gated",
            credential: Arc::new(GatedCredential {
                barrier: tokio::sync::Barrier::new(2),
            }),
            provider: None,
        }])
    }

    /// Both callers must be inside the token request together for either to get a token;
    /// a lock held across the request would leave them waiting for each other forever
    /// (the paused clock turns that into an immediate timeout).
    #[tokio::test(start_paused = true)]
    async fn token_requests_do_not_wait_for_each_other() {
        let unchosen = gated_chain();
        let chosen = gated_chain();
        chosen.chosen.set(0).expect("fresh chain");
        for chain in [unchosen, chosen] {
            let both = async { tokio::join!(chain.token(), chain.token()) };
            let (first, second) = tokio::time::timeout(Duration::from_secs(60), both)
                .await
                .expect("concurrent token requests run side by side");
            assert_eq!(first.expect("first").secret(), "entra-token");
            assert_eq!(second.expect("second").secret(), "entra-token");
            assert_eq!(chain.chosen.get(), Some(&0));
        }
    }

    #[test]
    fn multi_line_identity_errors_become_one_line() {
        assert_eq!(
            one_line("AADSTS700016: app not found\n\n  Trace ID: 42  \nmore"),
            "AADSTS700016: app not found Trace ID: 42 more"
        );
        assert_eq!(one_line("single"), "single");
    }
}
