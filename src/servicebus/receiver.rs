//! Peek-lock receiving with explicit credit (prefetch), settlement, and lock renewal.
//!
//! The link is attached the way Microsoft's clients attach peek-lock links: sender-settle-mode
//! unsettled, receiver-settle-mode `second` ("settle on dispose"). fe2o3 0.18's `accept` /
//! `modify` / `dispose` return as soon as our disposition is queued; when the broker's settled
//! answer arrives, fe2o3's receiver removes the delivery and drops the answer's state
//! (`link/mod.rs`, `on_incoming_disposition`). So a lock lost on the broker's side is not
//! reported back: the message is delivered again (at least once). Mode `first` behaves the
//! same for us and was measured to work against sblocal too; `second` is kept because it is
//! what Service Bus documents for peek-lock. Safety comes from lock renewal while processing
//! and from refusing to count a settlement whose lock has visibly expired.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::types::definitions::{self, Fields, ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::{
    Body, Message, MessageAnnotations, MessageId, Modified, Rejected,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};

use super::diagnostics::trace_context_of;
use super::link_errors;
use super::management::{timestamp_to_system_time, Management};
use super::{with_timeout, AmqpConnection, ServiceBusError};
use crate::auth::Credentials;
use crate::config::Namespace;

/// A message under a peek-lock.
pub struct ReceivedMessage {
    info: DeliveryInfo,
    pub lock_token: uuid::Uuid,
    pub message_id: Option<String>,
    pub body: MessageBody,
    /// Delivery attempts so far, this one included (Service Bus's DeliveryCount).
    pub delivery_count: u32,
    pub locked_until: Option<SystemTime>,
    pub sequence_number: Option<i64>,
    /// The sender's trace context (`traceparent`, else `Diagnostic-Id`), if it sent one.
    pub trace_context: Option<String>,
}

impl std::fmt::Debug for ReceivedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedMessage")
            .field("lock_token", &self.lock_token)
            .field("message_id", &self.message_id)
            .field("delivery_count", &self.delivery_count)
            .field("sequence_number", &self.sequence_number)
            .finish_non_exhaustive()
    }
}

/// A message body as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// Data sections (what every Service Bus SDK sends), concatenated.
    Bytes(Vec<u8>),
    /// An amqp-value string.
    Text(String),
    /// Anything else (sequence sections, non-string values, no body).
    Other(String),
}

impl MessageBody {
    /// The body as text, or why it is not text.
    pub fn as_text(&self) -> Result<&str, String> {
        match self {
            MessageBody::Bytes(bytes) => {
                std::str::from_utf8(bytes).map_err(|err| format!("body is not UTF-8: {err}"))
            }
            MessageBody::Text(text) => Ok(text),
            MessageBody::Other(kind) => Err(format!("body is {kind}, not text")),
        }
    }
}

/// A peek-lock receiver link on a queue, with its connection and `$management` client.
pub struct QueueReceiver {
    connection: AmqpConnection,
    link: Receiver,
    management: Option<Management>,
    queue: String,
    link_name: String,
}

impl QueueReceiver {
    /// Connect, authorise the queue, attach a peek-lock receiver with no credit yet.
    pub async fn open(
        namespace: &Namespace,
        credentials: Arc<Credentials>,
        queue: &str,
        timeout: Duration,
    ) -> Result<Self, ServiceBusError> {
        let mut connection = AmqpConnection::open(namespace, credentials, timeout).await?;
        connection.authorize(queue).await?;
        let link_name = format!("{queue}-receiver-{}", uuid::Uuid::new_v4());
        let mut properties = Fields::new();
        properties.insert(
            Symbol::from("com.microsoft:receiver-name"),
            Value::String(link_name.clone()),
        );
        let link = with_timeout("attach receiver", timeout, async {
            Receiver::builder()
                .name(link_name.clone())
                .source(queue)
                .target(format!("servicebusdemo-{}", uuid::Uuid::new_v4()))
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .receiver_settle_mode(ReceiverSettleMode::Second)
                .credit_mode(CreditMode::Manual)
                .properties(properties)
                .attach(&mut connection.session)
                .await
                .map_err(|err| {
                    link_errors::receiver_attach(&format!("attach receiver to {queue}"), &err)
                })
        })
        .await?;
        tracing::debug!(queue, "receiver attached");
        Ok(Self {
            connection,
            link,
            management: None,
            queue: queue.to_string(),
            link_name,
        })
    }

    /// Credit the broker may still use (messages it may send before we ask again).
    pub fn credit(&self) -> u32 {
        self.link.credit()
    }

    /// Allow the broker to send up to `credit` more messages (replaces the current credit).
    pub async fn set_credit(&mut self, credit: u32) -> Result<(), ServiceBusError> {
        self.link
            .set_credit(credit)
            .await
            .map_err(|err| ServiceBusError::Disconnected(format!("flow on {}: {err}", self.queue)))
    }

    /// Wait up to `wait` for the next message.
    pub async fn receive(
        &mut self,
        wait: Duration,
    ) -> Result<Option<ReceivedMessage>, ServiceBusError> {
        let context = format!("receive from {}", self.queue);
        let delivery = match tokio::time::timeout(wait, self.link.recv::<Body<Value>>()).await {
            Err(_) => return Ok(None),
            Ok(Err(err)) => return Err(link_errors::recv(&context, &err)),
            Ok(Ok(delivery)) => delivery,
        };
        let tag = delivery.delivery_tag().to_vec();
        let (info, message) = delivery.into_parts();
        Ok(Some(to_received(info, &tag, message)))
    }

    /// Complete: the message is done and leaves the queue.
    pub async fn complete(&self, message: &ReceivedMessage) -> Result<(), ServiceBusError> {
        self.link
            .accept(message.info.clone())
            .await
            .map_err(|err| self.settle_error("complete", err))
    }

    /// Abandon: the lock is released and the message is available again at once, with its
    /// delivery count increased.
    pub async fn abandon(&self, message: &ReceivedMessage) -> Result<(), ServiceBusError> {
        let modified = Modified {
            delivery_failed: Some(true),
            undeliverable_here: None,
            message_annotations: None,
        };
        self.link
            .modify(message.info.clone(), modified)
            .await
            .map_err(|err| self.settle_error("abandon", err))
    }

    /// Dead-letter with a reason and description (shown on the DLQ message).
    pub async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), ServiceBusError> {
        let mut info = Fields::new();
        info.insert(
            Symbol::from("DeadLetterReason"),
            Value::String(reason.to_string()),
        );
        info.insert(
            Symbol::from("DeadLetterErrorDescription"),
            Value::String(description.to_string()),
        );
        let error = definitions::Error::new(
            definitions::ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter")),
            None,
            Some(info),
        );
        let rejected = Rejected { error: Some(error) };
        self.link
            .dispose(message.info.clone(), rejected)
            .await
            .map_err(|err| self.settle_error("dead-letter", err))
    }

    /// Renew the message's lock through `<queue>/$management`; returns the new expiry.
    pub async fn renew_lock(
        &mut self,
        message: &ReceivedMessage,
    ) -> Result<SystemTime, ServiceBusError> {
        let timeout = self.connection.timeout;
        if self.management.is_none() {
            let management = Management::attach(
                &mut self.connection.session,
                &self.queue,
                &self.link_name,
                timeout,
            )
            .await?;
            self.management = Some(management);
        }
        let Some(management) = self.management.as_mut() else {
            return Err(ServiceBusError::Protocol("management link missing".into()));
        };
        let expirations = match management.renew_locks(&[message.lock_token], timeout).await {
            Ok(expirations) => expirations,
            Err(err) => {
                // fe2o3's management client does not match responses to requests: after a
                // timeout a late answer would be read as the next call's. Start afresh.
                if let Some(management) = self.management.take() {
                    tokio::spawn(management.close());
                }
                return Err(err);
            }
        };
        expirations.into_iter().next().ok_or_else(|| {
            ServiceBusError::Protocol("renew lock: the answer has no expiration".into())
        })
    }

    fn settle_error(&self, what: &str, err: fe2o3_amqp::link::DispositionError) -> ServiceBusError {
        ServiceBusError::Disconnected(format!("{what} on {}: {err}", self.queue))
    }

    /// Detach and close the connection.
    pub async fn close(self) {
        if let Some(management) = self.management {
            management.close().await;
        }
        if let Err(err) = self.link.close().await {
            tracing::debug!(error = %err, "receiver close");
        }
        self.connection.close().await;
    }
}

fn to_received(info: DeliveryInfo, tag: &[u8], message: Message<Body<Value>>) -> ReceivedMessage {
    let annotations = message.message_annotations.as_ref();
    let lock_token = lock_token(tag, annotations);
    let message_id = message
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
        .map(message_id_text);
    let delivery_count = message
        .header
        .as_ref()
        .map(|h| h.delivery_count)
        .unwrap_or(0)
        .saturating_add(1);
    let locked_until = annotation(annotations, "x-opt-locked-until").and_then(|v| match v {
        Value::Timestamp(ts) => Some(timestamp_to_system_time(ts)),
        Value::Long(ms) if *ms >= 0 => {
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(*ms as u64))
        }
        _ => None,
    });
    let sequence_number = annotation(annotations, "x-opt-sequence-number").and_then(|v| match v {
        Value::Long(n) => Some(*n),
        Value::Ulong(n) => i64::try_from(*n).ok(),
        _ => None,
    });
    let trace_context =
        trace_context_of(
            |name| match message.application_properties.as_ref()?.0.get(name)? {
                SimpleValue::String(text) => Some(text.as_str()),
                _ => None,
            },
        );
    ReceivedMessage {
        info,
        trace_context,
        lock_token,
        message_id,
        body: body_of(message.body),
        delivery_count,
        locked_until,
        sequence_number,
    }
}

/// The delivery tag is the lock token's 16 bytes in .NET GUID order (little-endian fields);
/// the `x-opt-lock-token` annotation is the fallback.
fn lock_token(tag: &[u8], annotations: Option<&MessageAnnotations>) -> uuid::Uuid {
    if let Ok(bytes) = <[u8; 16]>::try_from(tag) {
        return uuid::Uuid::from_bytes_le(bytes);
    }
    match annotation(annotations, "x-opt-lock-token") {
        Some(Value::Uuid(uuid)) => uuid::Uuid::from_bytes(*uuid.as_inner()),
        _ => uuid::Uuid::nil(),
    }
}

fn annotation<'a>(annotations: Option<&'a MessageAnnotations>, key: &str) -> Option<&'a Value> {
    annotations?
        .0
        .get(&fe2o3_amqp::types::messaging::annotations::OwnedKey::from(
            key,
        ))
}

fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => format!("{b:?}"),
    }
}

fn body_of(body: Body<Value>) -> MessageBody {
    match body {
        Body::Data(sections) => {
            let mut bytes = Vec::new();
            for section in sections.into_iter() {
                bytes.extend_from_slice(&section.0);
            }
            MessageBody::Bytes(bytes)
        }
        Body::Value(value) => match value.0 {
            Value::String(text) => MessageBody::Text(text),
            Value::Binary(bytes) => MessageBody::Bytes(bytes.into_vec()),
            other => MessageBody::Other(format!("an amqp-value {other:?}")),
        },
        Body::Sequence(_) => MessageBody::Other("amqp-sequence sections".into()),
        Body::Empty => MessageBody::Other("empty".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_token_reads_the_tag_as_a_little_endian_guid() {
        let token = uuid::Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff").expect("uuid");
        let tag = token.to_bytes_le();
        assert_eq!(lock_token(&tag, None), token);
    }

    #[test]
    fn body_text_or_reason() {
        assert_eq!(
            MessageBody::Bytes(b"Hello World!".to_vec()).as_text(),
            Ok("Hello World!")
        );
        assert!(MessageBody::Bytes(vec![0xff, 0xfe]).as_text().is_err());
        assert_eq!(MessageBody::Text("hi".into()).as_text(), Ok("hi"));
        assert!(MessageBody::Other("empty".into()).as_text().is_err());
    }
}
