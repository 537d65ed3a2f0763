//! The entity's `$management` node: lock renewal while a message takes longer than its lock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Message};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Timestamp, Uuid, Value};
use fe2o3_amqp_management::client::MgmtClient;
use fe2o3_amqp_management::error::{Error as MgmtError, InvalidType};
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;

use super::cbs::mgmt_error;
use super::{with_timeout, ServiceBusError};

const RENEW_LOCK: &str = "com.microsoft:renew-lock";

/// A request/response client on `<queue>/$management`.
pub struct Management {
    client: MgmtClient,
    /// The receiver link whose locks we renew (Service Bus routes the request by it).
    receiver_link_name: String,
}

impl Management {
    /// Attach to `<queue>/$management`, bounded by `timeout` like every other step.
    pub async fn attach(
        session: &mut SessionHandle<()>,
        queue: &str,
        receiver_link_name: &str,
        timeout: Duration,
    ) -> Result<Self, ServiceBusError> {
        let node = format!("{queue}/$management");
        let client = with_timeout("attach $management", timeout, async {
            // Replies come back to the node address itself, as Microsoft's SDKs arrange it.
            MgmtClient::builder()
                .management_node_address(node.clone())
                .client_node_addr(node)
                .attach(session)
                .await
                .map_err(|err| {
                    ServiceBusError::Disconnected(format!("attach {queue}/$management: {err}"))
                })
        })
        .await?;
        Ok(Self {
            client,
            receiver_link_name: receiver_link_name.to_string(),
        })
    }

    /// Renew the locks of `lock_tokens`; returns the new expiry of each.
    pub async fn renew_locks(
        &mut self,
        lock_tokens: &[uuid::Uuid],
        timeout: Duration,
    ) -> Result<Vec<SystemTime>, ServiceBusError> {
        let request = RenewLockRequest {
            lock_tokens: lock_tokens.to_vec(),
            receiver_link_name: self.receiver_link_name.clone(),
            server_timeout: timeout,
        };
        let response: RenewLockResponse = with_timeout("renew lock", timeout, async {
            self.client
                .call(request)
                .await
                .map_err(|err| mgmt_error("renew lock", err))
        })
        .await?;
        Ok(response.expirations)
    }

    pub async fn close(self) {
        if let Err(err) = self.client.close().await {
            tracing::debug!(error = %err, "management link close");
        }
    }
}

struct RenewLockRequest {
    lock_tokens: Vec<uuid::Uuid>,
    receiver_link_name: String,
    server_timeout: Duration,
}

impl Request for RenewLockRequest {
    const OPERATION: &'static str = RENEW_LOCK;
    type Response = RenewLockResponse;
    type Body = Value;

    fn manageable_entity_type(&mut self) -> Option<String> {
        Some("entity-mgmt".to_string())
    }

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        let timeout_ms = u32::try_from(self.server_timeout.as_millis()).unwrap_or(u32::MAX);
        Some(
            ApplicationProperties::builder()
                .insert(
                    "com.microsoft:server-timeout",
                    SimpleValue::Uint(timeout_ms),
                )
                .insert(
                    "associated-link-name",
                    SimpleValue::String(self.receiver_link_name.clone()),
                )
                .build(),
        )
    }

    fn encode_body(self) -> Self::Body {
        // AMQP uuids are big-endian (RFC 4122 order); lock tokens are kept as `uuid::Uuid`.
        let tokens: Vec<Value> = self
            .lock_tokens
            .iter()
            .map(|token| Value::Uuid(Uuid::from(*token.as_bytes())))
            .collect();
        let mut body = OrderedMap::new();
        body.insert(
            Value::String("lock-tokens".to_string()),
            Value::Array(Array::from(tokens)),
        );
        Value::Map(body)
    }
}

struct RenewLockResponse {
    expirations: Vec<SystemTime>,
}

impl Response for RenewLockResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Value;
    type Error = MgmtError;

    fn decode_message(message: Message<Self::Body>) -> Result<Self, Self::Error> {
        let invalid = |actual: String| InvalidType {
            expected: "map with expirations: array of timestamp".to_string(),
            actual,
        };
        let Value::Map(map) = message.body else {
            return Err(invalid(format!("{:?}", message.body)).into());
        };
        let expirations = match map.get(&Value::String("expirations".to_string())) {
            Some(Value::Array(array)) => array
                .0
                .iter()
                .map(|value| match value {
                    Value::Timestamp(ts) => Ok(timestamp_to_system_time(ts)),
                    other => Err(invalid(format!("{other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => return Err(invalid(format!("{other:?}")).into()),
            None => return Err(invalid("no expirations".to_string()).into()),
        };
        Ok(Self { expirations })
    }
}

pub fn timestamp_to_system_time(timestamp: &Timestamp) -> SystemTime {
    let millis = timestamp.milliseconds();
    if millis >= 0 {
        UNIX_EPOCH + Duration::from_millis(millis as u64)
    } else {
        UNIX_EPOCH
    }
}
