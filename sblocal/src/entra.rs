//! The Entra ID stand-in: exchanges a federated service-account token (client assertion) for a
//! Service Bus access token, as `login.microsoftonline.com` does for workload identity, and
//! serves the cluster OIDC issuer's discovery document and keys.
//!
//! Routes (HTTPS, the authority host):
//! - `POST /{tenant}/oauth2/v2.0/token` — client-credentials grant with a JWT-bearer assertion;
//! - `GET /{tenant}/v2.0/.well-known/openid-configuration`, `GET /{tenant}/discovery/v2.0/keys`;
//! - `GET /oidc/.well-known/openid-configuration`, `GET /oidc/openid/v1/jwks` (the issuer of
//!   service-account tokens, a Kubernetes cluster's role).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::SERVICE_BUS_AUDIENCE;
use crate::faults::{Counters, Faults};
use crate::identities::{Identities, Identity};
use crate::jwt::{self, Claims, SigningKey, VerifyingKey};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Clock skew Entra tolerates on an assertion's `nbf`.
const NOT_BEFORE_SKEW_SECS: i64 = 300;

/// Everything the token endpoint needs.
pub struct Entra {
    pub tenant_id: String,
    /// `https://localhost:PORT`, the authority host clients are given.
    pub authority: String,
    /// Issuer of service-account tokens (the cluster's OIDC issuer URL).
    pub oidc_issuer: String,
    issuer_keys: Vec<VerifyingKey>,
    token_key: SigningKey,
    identities: Arc<Identities>,
    default_lifetime: Duration,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
}

pub struct EntraSettings {
    pub authority: String,
    pub oidc_issuer: String,
    pub issuer_key: VerifyingKey,
    pub token_key: SigningKey,
    pub identities: Arc<Identities>,
    pub default_lifetime: Duration,
    pub faults: Arc<Faults>,
    pub counters: Arc<Counters>,
}

/// An Entra-style OAuth error: HTTP status, OAuth `error`, AADSTS code and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraError {
    pub status: StatusCode,
    pub error: &'static str,
    pub code: u32,
    pub description: String,
}

impl EntraError {
    fn new(status: StatusCode, error: &'static str, code: u32, description: String) -> Self {
        Self {
            status,
            error,
            code,
            description,
        }
    }

    fn missing(parameter: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{parameter}'."),
        )
    }
}

impl IntoResponse for EntraError {
    fn into_response(self) -> Response {
        let trace_id = uuid::Uuid::new_v4().to_string();
        let correlation_id = uuid::Uuid::new_v4().to_string();
        // Entra writes "2025-07-07 10:30:48Z".
        let timestamp = humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .replacen('T', " ", 1);
        let description = format!(
            "AADSTS{}: {} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}",
            self.code, self.description
        );
        let body = json!({
            "error": self.error,
            "error_description": description,
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
        });
        (self.status, Json(body)).into_response()
    }
}

/// The token request form (unknown fields ignored, everything optional so that a missing
/// parameter gets Entra's error rather than a framework one). `Debug` hides the assertion:
/// it is a bearer credential.
#[derive(Default, Deserialize)]
pub struct TokenForm {
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
    pub scope: Option<String>,
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
}

impl std::fmt::Debug for TokenForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenForm")
            .field("grant_type", &self.grant_type)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("client_assertion_type", &self.client_assertion_type)
            .field(
                "client_assertion",
                &self.client_assertion.as_ref().map(|_| REDACTED),
            )
            .finish()
    }
}

/// A successful exchange. `Debug` hides the access token.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub access_token: String,
    pub expires_in: u64,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &REDACTED)
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// What `Debug` shows in place of a credential.
const REDACTED: &str = "<redacted>";

impl Entra {
    pub fn new(settings: EntraSettings) -> Self {
        Self {
            tenant_id: settings.identities.tenant_id.clone(),
            authority: settings.authority,
            oidc_issuer: settings.oidc_issuer,
            issuer_keys: vec![settings.issuer_key],
            token_key: settings.token_key,
            identities: settings.identities,
            default_lifetime: settings.default_lifetime,
            faults: settings.faults,
            counters: settings.counters,
        }
    }

    /// The `iss` of access tokens this endpoint issues.
    pub fn access_token_issuer(&self) -> String {
        format!("{}/{}/v2.0", self.authority, self.tenant_id)
    }

    pub fn token_verifying_key(&self) -> VerifyingKey {
        self.token_key.verifying_key()
    }

    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    fn lifetime(&self) -> Duration {
        self.faults
            .token_lifetime_override()
            .unwrap_or(self.default_lifetime)
    }

    /// Validates a client-credentials request with a federated assertion and issues a token.
    pub fn exchange(&self, tenant: &str, form: &TokenForm) -> Result<IssuedToken, EntraError> {
        if !tenant.eq_ignore_ascii_case(&self.tenant_id) {
            return Err(EntraError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                90002,
                format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
            ));
        }
        let grant_type = form
            .grant_type
            .as_deref()
            .ok_or_else(|| EntraError::missing("grant_type"))?;
        if grant_type != "client_credentials" {
            return Err(EntraError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{grant_type}'."),
            ));
        }
        let client_id = form
            .client_id
            .as_deref()
            .ok_or_else(|| EntraError::missing("client_id"))?;
        let scope = form
            .scope
            .as_deref()
            .ok_or_else(|| EntraError::missing("scope"))?;
        let audience = resource_of_scope(scope)?;
        let identity = self.identities.by_client_id(client_id).ok_or_else(|| {
            EntraError::new(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                700016,
                format!("Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant.", self.tenant_id),
            )
        })?;
        match form.client_assertion_type.as_deref() {
            Some(JWT_BEARER) => {}
            Some(other) => {
                return Err(EntraError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    50027,
                    format!("Invalid client_assertion_type '{other}'."),
                ))
            }
            None => return Err(EntraError::missing("client_assertion_type")),
        }
        let assertion = form
            .client_assertion
            .as_deref()
            .ok_or_else(|| EntraError::missing("client_assertion"))?;
        self.check_assertion(identity, assertion)?;
        self.issue(identity, &audience)
    }

    fn check_assertion(&self, identity: &Identity, assertion: &str) -> Result<(), EntraError> {
        let claims = jwt::verify(assertion, &self.issuer_keys).map_err(|e| {
            let (code, text) = match e {
                jwt::JwtError::Signature | jwt::JwtError::UnknownKey(_) => (
                    700027,
                    "Client assertion failed signature validation.".to_string(),
                ),
                other => (50027, format!("Invalid JWT token. {other}.")),
            };
            EntraError::new(StatusCode::UNAUTHORIZED, "invalid_client", code, text)
        })?;
        let now = jwt::unix_now();
        let expiry = jwt::numeric_claim(&claims, "exp").unwrap_or(0);
        let not_before = jwt::numeric_claim(&claims, "nbf")
            .or_else(|| jwt::numeric_claim(&claims, "iat"))
            .unwrap_or(0);
        if expiry <= now || not_before > now + NOT_BEFORE_SKEW_SECS {
            return Err(EntraError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700024,
                format!("Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}.", utc(now), utc(not_before), utc(expiry)),
            ));
        }
        let issuer = string_claim(&claims, "iss");
        let subject = string_claim(&claims, "sub");
        let audiences = jwt::audiences(&claims);
        let matched = identity.federated_credentials.iter().any(|credential| {
            credential.subject == subject
                && credential.issuer.as_deref().unwrap_or(&self.oidc_issuer) == issuer
                && credential
                    .audiences
                    .iter()
                    .any(|aud| audiences.contains(aud))
        });
        if !matched {
            return Err(EntraError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                70021,
                format!("No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{}'.", audiences.join(",")),
            ));
        }
        Ok(())
    }

    fn issue(&self, identity: &Identity, audience: &str) -> Result<IssuedToken, EntraError> {
        let lifetime = self.lifetime().as_secs();
        let now = jwt::unix_now();
        let mut claims = Claims::new();
        claims.insert("aud".into(), json!(audience));
        claims.insert("iss".into(), json!(self.access_token_issuer()));
        claims.insert("iat".into(), json!(now));
        claims.insert("nbf".into(), json!(now));
        claims.insert("exp".into(), json!(now + lifetime as i64));
        claims.insert("appid".into(), json!(identity.client_id));
        claims.insert("azp".into(), json!(identity.client_id));
        claims.insert("idtyp".into(), json!("app"));
        claims.insert("oid".into(), json!(identity.object_id));
        claims.insert("sub".into(), json!(identity.object_id));
        claims.insert("tid".into(), json!(self.tenant_id));
        claims.insert(
            "uti".into(),
            json!(uuid::Uuid::new_v4().simple().to_string()),
        );
        claims.insert("ver".into(), json!("2.0"));
        let access_token = self.token_key.sign(&claims).map_err(|e| {
            EntraError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                90100,
                format!("Token signing failed: {e}"),
            )
        })?;
        Ok(IssuedToken {
            access_token,
            expires_in: lifetime,
        })
    }

    /// Mints a service-account token as the cluster issuer would project it into a pod.
    pub fn service_account_token(
        issuer_key: &SigningKey,
        issuer: &str,
        subject: &str,
        audience: &str,
        ttl_secs: i64,
    ) -> Result<String, jwt::JwtError> {
        let now = jwt::unix_now();
        // An already-expired token (negative ttl) was issued before it expired.
        let issued_at = now.min(now + ttl_secs) - 1;
        let mut claims = Claims::new();
        claims.insert("aud".into(), json!([audience]));
        claims.insert("iss".into(), json!(issuer));
        claims.insert("sub".into(), json!(subject));
        claims.insert("iat".into(), json!(issued_at));
        claims.insert("nbf".into(), json!(issued_at));
        claims.insert("exp".into(), json!(now + ttl_secs));
        claims.insert("jti".into(), json!(uuid::Uuid::new_v4().to_string()));
        issuer_key.sign(&claims)
    }
}

fn string_claim(claims: &Claims, name: &str) -> String {
    claims
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn utc(seconds: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The client-credentials flow takes `<resource>/.default`; the token's audience is the resource.
/// Only Service Bus is served here.
fn resource_of_scope(scope: &str) -> Result<String, EntraError> {
    let first = scope.split_whitespace().next().unwrap_or("");
    let resource = first.strip_suffix("/.default").ok_or_else(|| {
        EntraError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
        )
    })?;
    if resource.trim_end_matches('/') != SERVICE_BUS_AUDIENCE {
        return Err(EntraError::new(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            format!("The resource principal named {resource} was not found in the tenant. This local endpoint issues tokens for {SERVICE_BUS_AUDIENCE} only."),
        ));
    }
    Ok(SERVICE_BUS_AUDIENCE.to_string())
}

/// The routes of the token endpoint and the OIDC issuer.
pub fn routes(entra: Arc<Entra>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(tenant_discovery),
        )
        .route("/{tenant}/discovery/v2.0/keys", get(tenant_keys))
        .route(
            "/oidc/.well-known/openid-configuration",
            get(issuer_discovery),
        )
        .route("/oidc/openid/v1/jwks", get(issuer_keys))
        .with_state(entra)
}

async fn token(
    State(entra): State<Arc<Entra>>,
    Path(tenant): Path<String>,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    Counters::bump(&entra.counters.token_requests);
    // Every field is optional, so only a wrong content type is rejected; Entra then reports
    // the missing parameters, and so does this.
    let form = form.map(|Form(f)| f).unwrap_or_default();
    match entra.exchange(&tenant, &form) {
        Ok(issued) => {
            Counters::bump(&entra.counters.tokens_issued);
            tracing::info!(client_id = ?form.client_id, expires_in = issued.expires_in, "access token issued");
            Json(json!({
                "token_type": "Bearer",
                "expires_in": issued.expires_in,
                "ext_expires_in": issued.expires_in,
                "access_token": issued.access_token,
            }))
            .into_response()
        }
        Err(error) => {
            tracing::info!(
                code = error.code,
                "token request refused: {}",
                error.description
            );
            error.into_response()
        }
    }
}

async fn tenant_discovery(State(entra): State<Arc<Entra>>, Path(tenant): Path<String>) -> Response {
    if !tenant.eq_ignore_ascii_case(&entra.tenant_id) {
        return EntraError::new(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            90002,
            format!("Tenant '{tenant}' not found."),
        )
        .into_response();
    }
    let base = format!("{}/{}", entra.authority, entra.tenant_id);
    Json(json!({
        "issuer": entra.access_token_issuer(),
        "token_endpoint": format!("{base}/oauth2/v2.0/token"),
        "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
        "jwks_uri": format!("{base}/discovery/v2.0/keys"),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "tenant_region_scope": "NA",
        "cloud_instance_name": "localhost",
    }))
    .into_response()
}

async fn tenant_keys(State(entra): State<Arc<Entra>>) -> Json<Value> {
    Json(json!({"keys": [entra.token_key.verifying_key().to_jwk()]}))
}

async fn issuer_discovery(State(entra): State<Arc<Entra>>) -> Json<Value> {
    Json(json!({
        "issuer": entra.oidc_issuer,
        "jwks_uri": format!("{}/openid/v1/jwks", entra.oidc_issuer),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    }))
}

async fn issuer_keys(State(entra): State<Arc<Entra>>) -> Json<Value> {
    Json(json!({"keys": entra.issuer_keys.iter().map(VerifyingKey::to_jwk).collect::<Vec<_>>()}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identities::TOKEN_EXCHANGE_AUDIENCE;

    struct Fixture {
        entra: Entra,
        issuer_key: SigningKey,
        faults: Arc<Faults>,
    }

    const ISSUER: &str = "https://localhost:1/oidc";

    fn fixture() -> Fixture {
        let issuer_key = SigningKey::generate().expect("key");
        let faults = Arc::new(Faults::default());
        let entra = Entra::new(EntraSettings {
            authority: "https://localhost:1".into(),
            oidc_issuer: ISSUER.into(),
            issuer_key: issuer_key.verifying_key(),
            token_key: SigningKey::generate().expect("key"),
            identities: Arc::new(Identities::defaults()),
            default_lifetime: Duration::from_secs(3600),
            faults: faults.clone(),
            counters: Arc::new(Counters::default()),
        });
        Fixture {
            entra,
            issuer_key,
            faults,
        }
    }

    fn form(fixture: &Fixture, identity: &str, subject: &str, ttl: i64) -> TokenForm {
        let client_id = fixture
            .entra
            .identities()
            .by_name(identity)
            .expect("known")
            .client_id
            .clone();
        let assertion = Entra::service_account_token(
            &fixture.issuer_key,
            ISSUER,
            subject,
            TOKEN_EXCHANGE_AUDIENCE,
            ttl,
        )
        .expect("mint");
        TokenForm {
            grant_type: Some("client_credentials".into()),
            client_id: Some(client_id),
            scope: Some("https://servicebus.azure.net/.default".into()),
            client_assertion_type: Some(JWT_BEARER.into()),
            client_assertion: Some(assertion),
        }
    }

    #[test]
    fn debug_output_hides_assertions_and_tokens() {
        let f = fixture();
        let tenant = f.entra.tenant_id.clone();
        let request = form(
            &f,
            "servicebusdemo",
            "system:serviceaccount:default:servicebusdemo",
            600,
        );
        let assertion = request.client_assertion.clone().expect("assertion");
        let debug = format!("{request:?}");
        assert!(!debug.contains(&assertion), "{debug}");
        assert!(debug.contains("client_credentials"), "{debug}");

        let issued = f.entra.exchange(&tenant, &request).expect("issued");
        let debug = format!("{issued:?}");
        assert!(!debug.contains(&issued.access_token), "{debug}");
        assert!(debug.contains("expires_in: 3600"), "{debug}");
    }

    #[test]
    fn federated_assertion_is_exchanged_for_a_service_bus_token() {
        let f = fixture();
        let tenant = f.entra.tenant_id.clone();
        let request = form(
            &f,
            "servicebusdemo",
            "system:serviceaccount:default:servicebusdemo",
            600,
        );
        let issued = f.entra.exchange(&tenant, &request).expect("issued");
        assert_eq!(issued.expires_in, 3600);
        let claims =
            jwt::verify(&issued.access_token, &[f.entra.token_verifying_key()]).expect("verifies");
        let identity = f
            .entra
            .identities()
            .by_name("servicebusdemo")
            .expect("known");
        assert_eq!(claims["aud"], SERVICE_BUS_AUDIENCE);
        assert_eq!(claims["oid"], identity.object_id.as_str());
        assert_eq!(claims["appid"], identity.client_id.as_str());
        assert_eq!(claims["tid"], tenant.as_str());
        assert!(claims.get("roles").is_none());
    }

    #[test]
    fn wrong_subject_is_aadsts70021_and_expired_is_aadsts700024() {
        let f = fixture();
        let tenant = f.entra.tenant_id.clone();
        let wrong = form(
            &f,
            "servicebusdemo",
            "system:serviceaccount:default:someone-else",
            600,
        );
        let error = f.entra.exchange(&tenant, &wrong).unwrap_err();
        assert_eq!(error.code, 70021);
        assert_eq!(
            (error.status, error.error),
            (StatusCode::UNAUTHORIZED, "invalid_client")
        );
        assert!(error.description.contains("someone-else"));
        let expired = form(
            &f,
            "servicebusdemo",
            "system:serviceaccount:default:servicebusdemo",
            -10,
        );
        assert_eq!(
            f.entra.exchange(&tenant, &expired).unwrap_err().code,
            700024
        );
    }

    #[test]
    fn requests_are_checked_like_entra() {
        let f = fixture();
        let tenant = f.entra.tenant_id.clone();
        let good = || {
            form(
                &f,
                "servicebusdemo",
                "system:serviceaccount:default:servicebusdemo",
                600,
            )
        };
        assert_eq!(
            f.entra.exchange("other-tenant", &good()).unwrap_err().code,
            90002
        );
        let mut unknown_client = good();
        unknown_client.client_id = Some("00000000-0000-0000-0000-000000000000".into());
        assert_eq!(
            f.entra.exchange(&tenant, &unknown_client).unwrap_err().code,
            700016
        );
        let mut no_assertion = good();
        no_assertion.client_assertion = None;
        assert_eq!(
            f.entra.exchange(&tenant, &no_assertion).unwrap_err().code,
            900144
        );
        let mut storage = good();
        storage.scope = Some("https://storage.azure.com/.default".into());
        assert_eq!(
            f.entra.exchange(&tenant, &storage).unwrap_err().code,
            500011
        );
        let mut forged = good();
        let forger = SigningKey::generate().expect("key");
        forged.client_assertion = Some(
            Entra::service_account_token(
                &forger,
                ISSUER,
                "system:serviceaccount:default:servicebusdemo",
                TOKEN_EXCHANGE_AUDIENCE,
                600,
            )
            .expect("mint"),
        );
        let error = f.entra.exchange(&tenant, &forged).unwrap_err();
        assert_eq!(error.status, StatusCode::UNAUTHORIZED);
        // Another identity's subject does not match this client id's credential.
        let cross = form(
            &f,
            "servicebusdemo-producer",
            "system:serviceaccount:default:servicebusdemo",
            600,
        );
        assert_eq!(f.entra.exchange(&tenant, &cross).unwrap_err().code, 70021);
    }

    #[test]
    fn token_lifetime_fault_shortens_new_tokens() {
        let f = fixture();
        let tenant = f.entra.tenant_id.clone();
        f.faults.set_token_lifetime(Some(Duration::from_secs(5)));
        let request = form(
            &f,
            "servicebusdemo",
            "system:serviceaccount:default:servicebusdemo",
            600,
        );
        assert_eq!(
            f.entra
                .exchange(&tenant, &request)
                .expect("issued")
                .expires_in,
            5
        );
    }
}
