//! Compact JWS tokens signed with ES256 (ECDSA P-256, SHA-256) on `ring`.
//!
//! Two keys use this: the cluster OIDC issuer key (service-account tokens, what the kubelet
//! projects into a pod) and the token endpoint's key (access tokens). ES256 rather than RS256
//! because `ring` cannot generate RSA keys; no client here verifies the algorithm of an access
//! token, and Kubernetes issuers may use ES256 too.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

pub type Claims = Map<String, Value>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("not a compact JWS (header.payload.signature)")]
    Format,
    #[error("header or payload is not base64url JSON")]
    Encoding,
    #[error("unsupported algorithm {0:?} (only ES256)")]
    Algorithm(String),
    #[error("no key with id {0:?}")]
    UnknownKey(String),
    #[error("signature does not verify")]
    Signature,
    #[error("key error: {0}")]
    Key(String),
}

/// A private ES256 key with its key id (a thumbprint of the public key).
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8_pem: String,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate() -> Result<Self, JwtError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        Self::from_pem(&key.serialize_pem())
    }

    /// Parses a PKCS#8 PEM private key (as [`SigningKey::to_pem`] writes it).
    pub fn from_pem(pem: &str) -> Result<Self, JwtError> {
        let key = rcgen::KeyPair::from_pem(pem).map_err(|e| JwtError::Key(e.to_string()))?;
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            key.serialized_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| JwtError::Key(format!("not a P-256 PKCS#8 key: {e}")))?;
        let kid = thumbprint(pair.public_key().as_ref());
        Ok(Self {
            pair,
            pkcs8_pem: pem.to_string(),
            kid,
        })
    }

    /// Loads the key at `path`, or creates it there (mode 0600) when the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, JwtError> {
        match std::fs::read_to_string(path) {
            Ok(pem) => Self::from_pem(&pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                write_private(path, key.to_pem())
                    .map_err(|e| JwtError::Key(format!("cannot write {}: {e}", path.display())))?;
                Ok(key)
            }
            Err(e) => Err(JwtError::Key(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    pub fn to_pem(&self) -> &str {
        &self.pkcs8_pem
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            kid: self.kid.clone(),
            public: self.pair.public_key().as_ref().to_vec(),
        }
    }

    /// Signs `claims` as an ES256 JWT with this key's `kid` in the header.
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string())
        );
        let signature = self
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| JwtError::Key("signing failed".to_string()))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())
}

fn thumbprint(public_key: &[u8]) -> String {
    let digest = Sha256::digest(public_key);
    URL_SAFE_NO_PAD.encode(&digest[..16])
}

/// A public ES256 key (uncompressed SEC1 point) with its key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    pub kid: String,
    public: Vec<u8>,
}

impl VerifyingKey {
    /// The key as a JWK (`kty` EC, `crv` P-256), for JWKS documents.
    pub fn to_jwk(&self) -> Value {
        // An uncompressed point is 0x04 || X (32 bytes) || Y (32 bytes); ring only makes those.
        let (x, y) = self
            .public
            .get(1..)
            .and_then(|xy| xy.split_at_checked(32))
            .unwrap_or_default();
        json!({
            "kty": "EC",
            "crv": "P-256",
            "use": "sig",
            "alg": "ES256",
            "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
        })
    }
}

/// Decodes the claims of a JWT without verifying it (for error messages that name the
/// presented issuer and subject, as Entra's do).
pub fn peek_claims(token: &str) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (_, payload) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(_), None) => (h, p),
        _ => return Err(JwtError::Format),
    };
    decode_json(payload)
}

/// Verifies an ES256 JWT against `keys` (chosen by `kid`, or the only key when the header
/// names none) and returns its claims. Time claims are the caller's business.
pub fn verify(token: &str, keys: &[VerifyingKey]) -> Result<Claims, JwtError> {
    let token = token.trim();
    let (signing_input, signature) = token.rsplit_once('.').ok_or(JwtError::Format)?;
    let (header, payload) = signing_input.split_once('.').ok_or(JwtError::Format)?;
    if payload.contains('.') {
        return Err(JwtError::Format);
    }
    let header = decode_json(header)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg != "ES256" {
        return Err(JwtError::Algorithm(alg.to_string()));
    }
    let key = match header.get("kid").and_then(Value::as_str) {
        Some(kid) => keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| JwtError::UnknownKey(kid.to_string()))?,
        None if keys.len() == 1 => &keys[0],
        None => return Err(JwtError::UnknownKey(String::new())),
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Encoding)?;
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &key.public)
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|_| JwtError::Signature)?;
    decode_json(payload)
}

fn decode_json(part: &str) -> Result<Claims, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| JwtError::Encoding)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Encoding),
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A numeric claim (`exp`, `nbf`, `iat`), tolerating floats as some issuers write them.
pub fn numeric_claim(claims: &Claims, name: &str) -> Option<i64> {
    claims
        .get(name)
        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
}

/// The `aud` claim as a list (it may be a string or an array).
pub fn audiences(claims: &Claims) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        let mut claims = Claims::new();
        claims.insert("sub".into(), json!("system:serviceaccount:default:app"));
        claims.insert("aud".into(), json!(["api://AzureADTokenExchange"]));
        claims.insert("exp".into(), json!(unix_now() + 60));
        claims
    }

    #[test]
    fn signed_tokens_verify_and_round_trip_claims() {
        let key = SigningKey::generate().expect("key");
        let token = key.sign(&claims()).expect("sign");
        let verified = verify(&token, &[key.verifying_key()]).expect("verifies");
        assert_eq!(verified, claims());
        assert_eq!(audiences(&verified), vec!["api://AzureADTokenExchange"]);
    }

    #[test]
    fn another_key_or_a_changed_payload_fails() {
        let key = SigningKey::generate().expect("key");
        let other = SigningKey::generate().expect("key");
        let token = key.sign(&claims()).expect("sign");
        assert!(matches!(
            verify(&token, &[other.verifying_key()]),
            Err(JwtError::UnknownKey(_))
        ));
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims();
        forged.insert("sub".into(), json!("system:serviceaccount:default:admin"));
        let forged_payload = URL_SAFE_NO_PAD.encode(Value::Object(forged).to_string());
        parts[1] = &forged_payload;
        assert_eq!(
            verify(&parts.join("."), &[key.verifying_key()]),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn garbage_and_other_algorithms_are_refused() {
        let key = SigningKey::generate().expect("key");
        let keys = [key.verifying_key()];
        assert_eq!(verify("", &keys), Err(JwtError::Format));
        assert_eq!(verify("a.b", &keys), Err(JwtError::Format));
        assert_eq!(verify("a.b.c", &keys), Err(JwtError::Encoding));
        assert_eq!(verify("a.b.c.d", &keys), Err(JwtError::Format));
        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let payload = URL_SAFE_NO_PAD.encode("{}");
        assert_eq!(
            verify(&format!("{none_header}.{payload}."), &keys),
            Err(JwtError::Algorithm("none".into()))
        );
    }

    #[test]
    fn pem_round_trip_keeps_the_key_id() {
        let key = SigningKey::generate().expect("key");
        let again = SigningKey::from_pem(key.to_pem()).expect("parses");
        assert_eq!(key.kid(), again.kid());
        let jwk = key.verifying_key().to_jwk();
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(jwk["x"].as_str().unwrap_or(""))
                .map(|x| x.len()),
            Ok(32)
        );
    }

    #[test]
    fn load_or_create_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        let first = SigningKey::load_or_create(&path).expect("create");
        let second = SigningKey::load_or_create(&path).expect("load");
        assert_eq!(first.kid(), second.kid());
    }
}
