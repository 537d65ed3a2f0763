//! What a presented token grants. The broker's `$cbs` handler and the HTTP endpoints ask a
//! [`TokenValidator`]; they never parse tokens themselves.
//!
//! Two kinds of token are accepted, as Service Bus accepts them:
//! - SAS: `SharedAccessSignature sr=<url-encoded resource>&sig=<base64 HMAC-SHA256>&se=<expiry>&skn=<key name>`,
//!   the signature taken over `<url-encoded resource>\n<expiry>` with the key's UTF-8 bytes;
//! - Entra access tokens (JWT) from the local token endpoint, authorised by the role assignments
//!   of the identity named by their `oid` claim.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use crate::identities::Identities;
use crate::jwt::{self, VerifyingKey};

/// The rights a token carries for one entity, as Service Bus's claims name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights {
    pub send: bool,
    pub listen: bool,
    pub manage: bool,
}

impl Rights {
    pub const ALL: Rights = Rights {
        send: true,
        listen: true,
        manage: true,
    };
}

/// A successful validation: rights on the requested entity until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub rights: Rights,
    pub expires_at: SystemTime,
    /// Who presented it (SAS key name or identity name), for logs only.
    pub subject: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("invalid signature")]
    BadSignature,
    #[error("unknown key or identity: {0}")]
    UnknownPrincipal(String),
    #[error("token expired")]
    Expired,
    #[error("token does not cover entity {0}")]
    WrongResource(String),
}

/// Validates a token presented for an entity path such as `queue.1` (scheme, host and port
/// are never compared: clients disagree on them).
pub trait TokenValidator: Send + Sync + 'static {
    fn validate(&self, token: &str, entity_path: &str) -> Result<Grant, AuthError>;
}

/// The audience of Service Bus access tokens.
pub const SERVICE_BUS_AUDIENCE: &str = "https://servicebus.azure.net";
/// The namespace-wide key every namespace (and the emulator) has.
pub const ROOT_KEY_NAME: &str = "RootManageSharedAccessKey";

/// Characters `encodeURIComponent` leaves alone; everything else is percent-encoded.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

type HmacSha256 = Hmac<Sha256>;

/// Builds a SAS token for `resource_uri` valid until `expiry` (Unix seconds), the way the
/// official SDKs do.
pub fn sign_sas(resource_uri: &str, key_name: &str, key: &str, expiry: u64) -> String {
    let encoded_uri = utf8_percent_encode(resource_uri, URI_COMPONENT).to_string();
    let signature = STANDARD.encode(hmac_sha256(key, &format!("{encoded_uri}\n{expiry}")));
    format!(
        "SharedAccessSignature sr={encoded_uri}&sig={}&se={expiry}&skn={}",
        utf8_percent_encode(&signature, URI_COMPONENT),
        utf8_percent_encode(key_name, URI_COMPONENT)
    )
}

fn hmac_sha256(key: &str, message: &str) -> Vec<u8> {
    let mut mac = mac_for(key);
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn mac_for(key: &str) -> HmacSha256 {
    match HmacSha256::new_from_slice(key.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// The entity path a resource URI names: scheme, host and port dropped, slashes trimmed,
/// e.g. `sb://localhost:5672/queue.1/` -> `queue.1`, `https://ns.servicebus.windows.net` -> ``.
pub fn entity_path_of(resource: &str) -> String {
    let without_scheme = match resource.find("://") {
        Some(index) => &resource[index + 3..],
        None => resource,
    };
    let path = if resource.contains("://") {
        without_scheme
            .find('/')
            .map_or("", |index| &without_scheme[index..])
    } else {
        without_scheme
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.trim_matches('/').to_string()
}

/// Whether a token for `resource_path` covers `entity_path` (a namespace token covers all; a
/// queue token covers the queue's sub-entities such as `$DeadLetterQueue` and `$management`).
pub fn covers(resource_path: &str, entity_path: &str) -> bool {
    let resource = resource_path.trim_matches('/').to_ascii_lowercase();
    let entity = entity_path.trim_matches('/').to_ascii_lowercase();
    resource.is_empty()
        || entity == resource
        || entity
            .strip_prefix(&resource)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn unix_to_system_time(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64)
}

/// One shared access policy: a key name, its key and what it allows.
#[derive(Clone)]
pub struct SasRule {
    pub key_name: String,
    pub key: String,
    pub rights: Rights,
}

impl std::fmt::Debug for SasRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasRule")
            .field("key_name", &self.key_name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

struct SasToken {
    resource_raw: String,
    resource: String,
    signature: Vec<u8>,
    expiry_raw: String,
    expiry: i64,
    key_name: String,
}

fn parse_sas(token: &str) -> Result<SasToken, AuthError> {
    let body = token
        .trim()
        .strip_prefix("SharedAccessSignature ")
        .ok_or_else(|| AuthError::Malformed("not a SharedAccessSignature".into()))?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for pair in body.trim().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "sr" => sr = Some(value),
            "sig" => sig = Some(value),
            "se" => se = Some(value),
            "skn" => skn = Some(value),
            _ => {}
        }
    }
    let missing = |field: &str| AuthError::Malformed(format!("SAS token has no {field}"));
    let resource_raw = sr.ok_or_else(|| missing("sr"))?.to_string();
    let decode = |value: &str| percent_decode_str(value).decode_utf8_lossy().into_owned();
    let signature = STANDARD
        .decode(decode(sig.ok_or_else(|| missing("sig"))?))
        .map_err(|_| AuthError::Malformed("sig is not base64".into()))?;
    let expiry_raw = se.ok_or_else(|| missing("se"))?.to_string();
    let expiry = expiry_raw
        .parse::<i64>()
        .map_err(|_| AuthError::Malformed("se is not a number".into()))?;
    Ok(SasToken {
        resource: decode(&resource_raw),
        resource_raw,
        signature,
        expiry_raw,
        expiry,
        key_name: decode(skn.ok_or_else(|| missing("skn"))?),
    })
}

/// Validates SAS tokens against the namespace's shared access policies.
#[derive(Debug, Clone)]
pub struct SasValidator {
    rules: Vec<SasRule>,
}

impl SasValidator {
    pub fn new(rules: Vec<SasRule>) -> Self {
        Self { rules }
    }

    pub fn validate(&self, token: &str, entity_path: &str) -> Result<Grant, AuthError> {
        let parsed = parse_sas(token)?;
        let rule = self
            .rules
            .iter()
            .find(|rule| rule.key_name == parsed.key_name)
            .ok_or_else(|| AuthError::UnknownPrincipal(parsed.key_name.clone()))?;
        if !signature_matches(rule, &parsed) {
            return Err(AuthError::BadSignature);
        }
        if parsed.expiry <= jwt::unix_now() {
            return Err(AuthError::Expired);
        }
        if !covers(&entity_path_of(&parsed.resource), entity_path) {
            return Err(AuthError::WrongResource(entity_path.to_string()));
        }
        Ok(Grant {
            rights: rule.rights,
            expires_at: unix_to_system_time(parsed.expiry),
            subject: rule.key_name.clone(),
        })
    }
}

/// The signature covers the resource as the client encoded it; encoders differ in the case of
/// percent escapes and in which characters they escape, so the raw form and the common
/// re-encodings are all tried.
fn signature_matches(rule: &SasRule, token: &SasToken) -> bool {
    let upper = utf8_percent_encode(&token.resource, URI_COMPONENT).to_string();
    let lower = lowercase_escapes(&upper);
    let mut candidates = vec![token.resource_raw.clone(), upper, lower];
    candidates.dedup();
    candidates.iter().any(|resource| {
        let mut mac = mac_for(&rule.key);
        mac.update(format!("{resource}\n{}", token.expiry_raw).as_bytes());
        mac.verify_slice(&token.signature).is_ok()
    })
}

fn lowercase_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut escape_left = 0;
    for c in encoded.chars() {
        if c == '%' {
            escape_left = 2;
            out.push(c);
        } else if escape_left > 0 {
            escape_left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Validates access tokens issued by the local token endpoint and maps their `oid` to roles.
pub struct JwtValidator {
    keys: Vec<VerifyingKey>,
    issuer: String,
    identities: Arc<Identities>,
}

impl JwtValidator {
    pub fn new(keys: Vec<VerifyingKey>, issuer: String, identities: Arc<Identities>) -> Self {
        Self {
            keys,
            issuer,
            identities,
        }
    }

    pub fn validate(&self, token: &str, entity_path: &str) -> Result<Grant, AuthError> {
        let token = token.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        let claims = jwt::verify(token, &self.keys).map_err(|e| match e {
            jwt::JwtError::Signature | jwt::JwtError::UnknownKey(_) => AuthError::BadSignature,
            other => AuthError::Malformed(other.to_string()),
        })?;
        let now = jwt::unix_now();
        let expiry = jwt::numeric_claim(&claims, "exp")
            .ok_or_else(|| AuthError::Malformed("no exp claim".into()))?;
        if expiry <= now {
            return Err(AuthError::Expired);
        }
        if jwt::numeric_claim(&claims, "nbf").is_some_and(|nbf| nbf > now + 300) {
            return Err(AuthError::Malformed("token not yet valid (nbf)".into()));
        }
        let issuer = claims.get("iss").and_then(|v| v.as_str()).unwrap_or("");
        if issuer != self.issuer {
            return Err(AuthError::Malformed(format!(
                "unexpected issuer {issuer:?}"
            )));
        }
        let audience_ok = jwt::audiences(&claims)
            .iter()
            .any(|aud| aud.trim_end_matches('/') == SERVICE_BUS_AUDIENCE);
        if !audience_ok {
            return Err(AuthError::WrongResource(entity_path.to_string()));
        }
        let object_id = claims.get("oid").and_then(|v| v.as_str()).unwrap_or("");
        let identity = self
            .identities
            .by_object_id(object_id)
            .ok_or_else(|| AuthError::UnknownPrincipal(object_id.to_string()))?;
        Ok(Grant {
            rights: identity.rights_on(entity_path),
            expires_at: unix_to_system_time(expiry),
            subject: identity.name.clone(),
        })
    }
}

/// SAS and (when configured) Entra JWTs, chosen by the token's shape.
pub struct Validator {
    sas: SasValidator,
    jwt: Option<JwtValidator>,
}

impl Validator {
    pub fn new(sas: SasValidator, jwt: Option<JwtValidator>) -> Self {
        Self { sas, jwt }
    }
}

impl TokenValidator for Validator {
    fn validate(&self, token: &str, entity_path: &str) -> Result<Grant, AuthError> {
        if token.trim_start().starts_with("SharedAccessSignature") {
            return self.sas.validate(token, entity_path);
        }
        match &self.jwt {
            Some(jwt) => jwt.validate(token, entity_path),
            None => Err(AuthError::Malformed(
                "expected a SharedAccessSignature".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identities::Role;
    use crate::jwt::{Claims, SigningKey};
    use serde_json::json;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";

    fn sas() -> SasValidator {
        SasValidator::new(vec![
            SasRule {
                key_name: ROOT_KEY_NAME.into(),
                key: KEY.into(),
                rights: Rights::ALL,
            },
            SasRule {
                key_name: "send-only".into(),
                key: "other".into(),
                rights: Rights {
                    send: true,
                    ..Rights::default()
                },
            },
        ])
    }

    fn later() -> u64 {
        jwt::unix_now() as u64 + 600
    }

    #[test]
    fn resource_paths_ignore_scheme_host_and_port() {
        assert_eq!(entity_path_of("sb://localhost:5672/queue.1"), "queue.1");
        assert_eq!(entity_path_of("amqps://localhost/queue.1/"), "queue.1");
        assert_eq!(entity_path_of("https://localhost:5443"), "");
        assert_eq!(entity_path_of("https://h/q?api-version=1"), "q");
        assert_eq!(entity_path_of("queue.1"), "queue.1");
        assert!(covers("", "queue.1"));
        assert!(covers("queue.1", "queue.1/$DeadLetterQueue"));
        assert!(covers("Queue.1", "queue.1"));
        assert!(!covers("queue.1", "queue.10"));
        assert!(!covers("queue.2", "queue.1"));
    }

    #[test]
    fn sas_round_trip_grants_the_rules_rights() {
        let token = sign_sas("sb://localhost/queue.1", ROOT_KEY_NAME, KEY, later());
        let grant = sas().validate(&token, "queue.1").expect("valid");
        assert_eq!(grant.rights, Rights::ALL);
        assert_eq!(grant.subject, ROOT_KEY_NAME);
        let namespace = sign_sas("sb://localhost:5672", "send-only", "other", later());
        let grant = sas().validate(&namespace, "queue.1").expect("valid");
        assert!(grant.rights.send && !grant.rights.listen);
    }

    #[test]
    fn sas_signed_by_python_style_encoder_is_accepted() {
        // quote_plus writes lowercase-insensitive uppercase escapes and the same set as
        // encodeURIComponent for these characters; .NET writes lowercase escapes.
        let resource = "sb://localhost:5672/queue.1";
        let expiry = later();
        let encoded_lower = "sb%3a%2f%2flocalhost%3a5672%2fqueue.1";
        let sig = STANDARD.encode(hmac_sha256(KEY, &format!("{encoded_lower}\n{expiry}")));
        let token = format!(
            "SharedAccessSignature sr={encoded_lower}&sig={}&se={expiry}&skn={ROOT_KEY_NAME}",
            utf8_percent_encode(&sig, URI_COMPONENT)
        );
        assert!(sas().validate(&token, "queue.1").is_ok());
        assert_eq!(entity_path_of(resource), "queue.1");
    }

    #[test]
    fn bad_sas_tokens_are_refused_with_the_reason() {
        let v = sas();
        let wrong_key = sign_sas("sb://localhost/queue.1", ROOT_KEY_NAME, "bm9wZQ==", later());
        assert_eq!(
            v.validate(&wrong_key, "queue.1"),
            Err(AuthError::BadSignature)
        );
        let expired = sign_sas(
            "sb://localhost/queue.1",
            ROOT_KEY_NAME,
            KEY,
            jwt::unix_now() as u64 - 1,
        );
        assert_eq!(v.validate(&expired, "queue.1"), Err(AuthError::Expired));
        let unknown = sign_sas("sb://localhost/queue.1", "nobody", KEY, later());
        assert!(matches!(
            v.validate(&unknown, "queue.1"),
            Err(AuthError::UnknownPrincipal(_))
        ));
        let other_queue = sign_sas("sb://localhost/queue.2", ROOT_KEY_NAME, KEY, later());
        assert!(matches!(
            v.validate(&other_queue, "queue.1"),
            Err(AuthError::WrongResource(_))
        ));
        for garbage in [
            "",
            "SharedAccessSignature ",
            "SharedAccessSignature sr=a&sig=!!&se=1&skn=x",
            "SharedAccessSignature sr=a&sig=AA==&se=soon&skn=x",
        ] {
            assert!(
                matches!(v.validate(garbage, "q"), Err(AuthError::Malformed(_))),
                "{garbage:?}"
            );
        }
    }

    fn access_token(key: &SigningKey, oid: &str, exp_offset: i64, aud: &str) -> String {
        let now = jwt::unix_now();
        let mut claims = Claims::new();
        claims.insert("iss".into(), json!("https://issuer/tenant/v2.0"));
        claims.insert("aud".into(), json!(aud));
        claims.insert("oid".into(), json!(oid));
        claims.insert("exp".into(), json!(now + exp_offset));
        claims.insert("nbf".into(), json!(now));
        key.sign(&claims).expect("sign")
    }

    #[test]
    fn jwt_rights_come_from_role_assignments() {
        let key = SigningKey::generate().expect("key");
        let identities = Arc::new(Identities::defaults());
        let validator = Validator::new(
            sas(),
            Some(JwtValidator::new(
                vec![key.verifying_key()],
                "https://issuer/tenant/v2.0".into(),
                identities.clone(),
            )),
        );
        let producer = identities
            .by_name("servicebusdemo-producer")
            .expect("present");
        let token = access_token(&key, &producer.object_id, 600, SERVICE_BUS_AUDIENCE);
        let grant = validator.validate(&token, "queue.1").expect("valid");
        assert_eq!(grant.rights, Role::DataSender.rights());
        assert_eq!(grant.subject, "servicebusdemo-producer");

        let expired = access_token(&key, &producer.object_id, -1, SERVICE_BUS_AUDIENCE);
        assert_eq!(
            validator.validate(&expired, "queue.1"),
            Err(AuthError::Expired)
        );
        let other_aud = access_token(&key, &producer.object_id, 600, "https://storage.azure.com");
        assert!(matches!(
            validator.validate(&other_aud, "queue.1"),
            Err(AuthError::WrongResource(_))
        ));
        let stranger = access_token(
            &key,
            "00000000-0000-0000-0000-000000000000",
            600,
            SERVICE_BUS_AUDIENCE,
        );
        assert!(matches!(
            validator.validate(&stranger, "queue.1"),
            Err(AuthError::UnknownPrincipal(_))
        ));
        let forger = SigningKey::generate().expect("key");
        let forged = access_token(&forger, &producer.object_id, 600, SERVICE_BUS_AUDIENCE);
        assert_eq!(
            validator.validate(&forged, "queue.1"),
            Err(AuthError::BadSignature)
        );
    }
}
