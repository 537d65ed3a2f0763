//! What a presented token grants. The broker's `$cbs` handler and the HTTP endpoints ask a
//! [`TokenValidator`]; they never parse tokens themselves.

use std::time::SystemTime;

/// The rights a token carries for one entity, as Service Bus's claims name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights {
    pub send: bool,
    pub listen: bool,
    pub manage: bool,
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
