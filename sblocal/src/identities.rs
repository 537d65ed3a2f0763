//! Entra identities (app registrations / managed identities) known to the token endpoint: their
//! ids, Service Bus role assignments and federated identity credentials.
//!
//! File format (JSON, `serve --identities FILE`; every field but `name` is optional):
//! ```json
//! {
//!   "tenant_id": "…",
//!   "identities": [
//!     {
//!       "name": "servicebusdemo-producer",
//!       "client_id": "…", "object_id": "…",
//!       "roles": ["Azure Service Bus Data Sender"],
//!       "federated_credentials": [
//!         {"subject": "system:serviceaccount:default:servicebusdemo-producer",
//!          "issuer": "https://…", "audiences": ["api://AzureADTokenExchange"]}
//!       ]
//!     }
//!   ]
//! }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::Rights;

/// The audience Entra requires in a federated assertion by default.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The identity `workload.env` is written for unless `serve --identity` names another.
pub const DEFAULT_IDENTITY: &str = "servicebusdemo";
/// The Kubernetes namespace of the default service accounts.
pub const DEFAULT_K8S_NAMESPACE: &str = "default";

/// A Service Bus data-plane role, as Azure RBAC names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    #[serde(rename = "Azure Service Bus Data Sender")]
    DataSender,
    #[serde(rename = "Azure Service Bus Data Receiver")]
    DataReceiver,
    #[serde(rename = "Azure Service Bus Data Owner")]
    DataOwner,
}

impl Role {
    pub fn rights(self) -> Rights {
        match self {
            Role::DataSender => Rights {
                send: true,
                ..Rights::default()
            },
            Role::DataReceiver => Rights {
                listen: true,
                ..Rights::default()
            },
            Role::DataOwner => Rights {
                send: true,
                listen: true,
                manage: true,
            },
        }
    }
}

/// A role assignment: a bare role name applies to the whole namespace; `{"role", "scope"}` limits
/// it to one entity (a queue name, as an Azure role assignment scoped to a queue does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, try_from = "RawAssignment")]
pub enum RoleAssignment {
    Namespace(Role),
    Scoped { role: Role, scope: String },
}

/// The file's form, parsed leniently so that a wrong role name gets an error that lists the
/// valid ones (an untagged enum would only say that nothing matched).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawAssignment {
    Namespace(String),
    Scoped { role: String, scope: String },
}

impl TryFrom<RawAssignment> for RoleAssignment {
    type Error = String;

    fn try_from(raw: RawAssignment) -> Result<Self, String> {
        let role = |name: &str| {
            serde_json::from_value::<Role>(serde_json::Value::String(name.to_string())).map_err(
                |_| {
                    format!(
                        "unknown role {name:?} (expected \"Azure Service Bus Data Sender\", \"Azure Service Bus Data Receiver\" or \"Azure Service Bus Data Owner\")"
                    )
                },
            )
        };
        match raw {
            RawAssignment::Namespace(name) => Ok(RoleAssignment::Namespace(role(&name)?)),
            RawAssignment::Scoped { role: name, scope } => Ok(RoleAssignment::Scoped {
                role: role(&name)?,
                scope,
            }),
        }
    }
}

impl RoleAssignment {
    fn applies_to(&self, entity_path: &str) -> bool {
        match self {
            RoleAssignment::Namespace(_) => true,
            RoleAssignment::Scoped { scope, .. } => crate::auth::covers(scope, entity_path),
        }
    }

    fn role(&self) -> Role {
        match self {
            RoleAssignment::Namespace(role) | RoleAssignment::Scoped { role, .. } => *role,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederatedCredential {
    pub subject: String,
    /// The OIDC issuer the assertion must name; `None` = this broker's own issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
}

fn default_audiences() -> Vec<String> {
    vec![TOKEN_EXCHANGE_AUDIENCE.to_string()]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    /// The application (client) id; derived from the name when absent.
    #[serde(default)]
    pub client_id: String,
    /// The service principal's object id (the `oid` claim); derived from the name when absent.
    #[serde(default)]
    pub object_id: String,
    #[serde(default)]
    pub roles: Vec<RoleAssignment>,
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredential>,
}

impl Identity {
    /// What the identity's role assignments grant on `entity_path` (e.g. `queue.1`).
    pub fn rights_on(&self, entity_path: &str) -> Rights {
        self.roles
            .iter()
            .filter(|assignment| assignment.applies_to(entity_path))
            .fold(Rights::default(), |acc, assignment| {
                let r = assignment.role().rights();
                Rights {
                    send: acc.send || r.send,
                    listen: acc.listen || r.listen,
                    manage: acc.manage || r.manage,
                }
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identities {
    #[serde(default)]
    pub tenant_id: String,
    pub identities: Vec<Identity>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentitiesError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid identities file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("identity #{0} has an empty name")]
    EmptyName(usize),
    #[error("identity {0} is defined more than once")]
    Duplicate(String),
    #[error("client id {0} is used by more than one identity")]
    DuplicateClientId(String),
    #[error("no identity named {0:?} (known: {1})")]
    Unknown(String, String),
}

impl Identities {
    /// The project's default identities: the tutorial's single Owner identity plus one least-privilege
    /// identity per role, each federated with `system:serviceaccount:default:<name>`.
    pub fn defaults() -> Self {
        let identity = |name: &str, role: Role| Identity {
            name: name.to_string(),
            client_id: String::new(),
            object_id: String::new(),
            roles: vec![RoleAssignment::Namespace(role)],
            federated_credentials: vec![FederatedCredential {
                subject: service_account_subject(DEFAULT_K8S_NAMESPACE, name),
                issuer: None,
                audiences: default_audiences(),
            }],
        };
        let mut identities = Self {
            tenant_id: String::new(),
            identities: vec![
                identity("servicebusdemo", Role::DataOwner),
                identity("servicebusdemo-producer", Role::DataSender),
                identity("servicebusdemo-consumer", Role::DataReceiver),
                identity("servicebusdemo-scaler", Role::DataOwner),
            ],
        };
        identities.fill_derived_ids();
        identities
    }

    pub fn load(path: &Path) -> Result<Self, IdentitiesError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentitiesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, IdentitiesError> {
        let mut identities: Self = serde_json::from_str(text)?;
        identities.fill_derived_ids();
        identities.validate()?;
        Ok(identities)
    }

    fn fill_derived_ids(&mut self) {
        if self.tenant_id.is_empty() {
            self.tenant_id = derived_uuid("tenant", "sblocal");
        }
        for identity in &mut self.identities {
            if identity.client_id.is_empty() {
                identity.client_id = derived_uuid("client", &identity.name);
            }
            if identity.object_id.is_empty() {
                identity.object_id = derived_uuid("object", &identity.name);
            }
        }
    }

    fn validate(&self) -> Result<(), IdentitiesError> {
        for (index, identity) in self.identities.iter().enumerate() {
            if identity.name.trim().is_empty() {
                return Err(IdentitiesError::EmptyName(index));
            }
            let earlier = &self.identities[..index];
            if earlier.iter().any(|i| i.name == identity.name) {
                return Err(IdentitiesError::Duplicate(identity.name.clone()));
            }
            if earlier.iter().any(|i| i.client_id == identity.client_id) {
                return Err(IdentitiesError::DuplicateClientId(
                    identity.client_id.clone(),
                ));
            }
        }
        Ok(())
    }

    pub fn by_name(&self, name: &str) -> Result<&Identity, IdentitiesError> {
        self.identities
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.identities.iter().map(|i| i.name.as_str()).collect();
                IdentitiesError::Unknown(name.to_string(), known.join(", "))
            })
    }

    pub fn by_client_id(&self, client_id: &str) -> Option<&Identity> {
        self.identities
            .iter()
            .find(|i| i.client_id.eq_ignore_ascii_case(client_id))
    }

    pub fn by_object_id(&self, object_id: &str) -> Option<&Identity> {
        self.identities
            .iter()
            .find(|i| i.object_id.eq_ignore_ascii_case(object_id))
    }
}

/// The `sub` of a Kubernetes service-account token.
pub fn service_account_subject(namespace: &str, service_account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{service_account}")
}

/// A stable UUID-shaped id derived from a name, so default identities keep their ids across runs.
fn derived_uuid(kind: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("sblocal:{kind}:{name}"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_manifests() {
        let identities = Identities::defaults();
        let owner = identities.by_name("servicebusdemo").expect("present");
        assert_eq!(owner.rights_on("queue.1"), Role::DataOwner.rights());
        assert_eq!(
            owner.federated_credentials[0].subject,
            "system:serviceaccount:default:servicebusdemo"
        );
        let producer = identities
            .by_name("servicebusdemo-producer")
            .expect("present");
        assert!(producer.rights_on("queue.1").send && !producer.rights_on("queue.1").listen);
        let consumer = identities
            .by_name("servicebusdemo-consumer")
            .expect("present");
        assert!(consumer.rights_on("queue.1").listen && !consumer.rights_on("queue.1").send);
        assert!(
            identities
                .by_name("servicebusdemo-scaler")
                .expect("present")
                .rights_on("queue.1")
                .manage
        );
        assert_eq!(identities.validate().ok(), Some(()));
        assert_eq!(Identities::defaults(), identities, "ids are stable");
    }

    #[test]
    fn file_parses_with_derived_ids_and_role_names() {
        let text = r#"{"identities":[{"name":"app","roles":["Azure Service Bus Data Receiver"],
            "federated_credentials":[{"subject":"system:serviceaccount:ns:app"}]}]}"#;
        let identities = Identities::parse(text).expect("parses");
        let app = identities.by_name("app").expect("present");
        assert_eq!(app.client_id.len(), 36);
        assert_eq!(
            app.federated_credentials[0].audiences,
            vec![TOKEN_EXCHANGE_AUDIENCE]
        );
        assert!(identities
            .by_client_id(&app.client_id.to_uppercase())
            .is_some());
    }

    #[test]
    fn scoped_role_assignments_apply_to_their_queue_only() {
        let text = r#"{"identities":[{"name":"app","roles":[
            "Azure Service Bus Data Receiver",
            {"role":"Azure Service Bus Data Sender","scope":"orders"}]}]}"#;
        let identities = Identities::parse(text).expect("parses");
        let app = identities.by_name("app").expect("present");
        assert_eq!(
            app.rights_on("orders"),
            Rights {
                send: true,
                listen: true,
                manage: false
            }
        );
        assert!(app.rights_on("orders/$DeadLetterQueue").send);
        assert!(!app.rights_on("audit").send && app.rights_on("audit").listen);
    }

    #[test]
    fn bad_files_are_refused() {
        let unknown_role = Identities::parse(r#"{"identities":[{"name":"a","roles":["Reader"]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            unknown_role.contains("\"Reader\"") && unknown_role.contains("Data Owner"),
            "{unknown_role}"
        );
        assert!(matches!(
            Identities::parse(r#"{"identities":[{"name":"a"},{"name":"a"}]}"#),
            Err(IdentitiesError::Duplicate(_))
        ));
        assert!(matches!(
            Identities::defaults().by_name("nobody"),
            Err(IdentitiesError::Unknown(..))
        ));
    }
}
