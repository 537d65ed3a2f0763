//! Sending to a queue in batches packed to the link's maximum message size.
//!
//! A Service Bus batch is one AMQP transfer with message format `0x80013700` whose body is a
//! sequence of data sections, each holding one complete encoded message. The broker stores
//! each as its own message and settles the transfer once for all of them.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::{DeliveryFut, Sendable};
use fe2o3_amqp::link::{SendError, Sender};
use fe2o3_amqp::types::definitions::SenderSettleMode;
use fe2o3_amqp::types::messaging::{Batch, Data, Message, Outcome};
use fe2o3_amqp::types::primitives::Binary;

use super::link_errors;
use super::{with_timeout, AmqpConnection, ServiceBusError};
use crate::auth::Credentials;
use crate::config::Namespace;

/// Message format of a Service Bus batch (Microsoft's vendor prefix 0x800137, format 0).
pub const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;
/// Used when the broker announces no limit: Standard tier's 256 KiB.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 256 * 1024;

/// A message to send. The body is shared: a producer sends the same body many times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub message_id: String,
    pub body: Arc<[u8]>,
    pub application_properties: Vec<(String, String)>,
}

// AMQP 1.0 encodings (part 1 "types", part 3 "messaging") of the sections a message we send
// has: properties (only message-id set), application-properties (string to string), one data
// section. Written directly rather than through fe2o3's Message: building, serialising and
// dropping that per message (a map with hashing, owned copies of every string and the body)
// made most of the producer's allocations; writing it directly took its user CPU from 0.48 s
// to 0.28 s for 300,000 messages. The unit tests hold the output byte for byte to fe2o3's.
const DESCRIBED: u8 = 0x00;
const SMALL_ULONG: u8 = 0x53;
const PROPERTIES: u8 = 0x73;
const APPLICATION_PROPERTIES: u8 = 0x74;
const DATA: u8 = 0x75;
const LIST8: u8 = 0xc0;
const LIST32: u8 = 0xd0;
const MAP8: u8 = 0xc1;
const MAP32: u8 = 0xd1;
const STR8: u8 = 0xa1;
const STR32: u8 = 0xb1;
const VBIN8: u8 = 0xa0;
const VBIN32: u8 = 0xb0;

/// Encode a message as it travels inside a batch's data section.
pub fn encode(message: &OutgoingMessage) -> Result<Vec<u8>, ServiceBusError> {
    let too_large = || ServiceBusError::MessageTooLarge("a message exceeds 4 GiB".into());
    let pairs = &message.application_properties;
    let id_size = variable_size(message.message_id.len());
    let pairs_size: usize = pairs
        .iter()
        .map(|(key, value)| variable_size(key.len()) + variable_size(value.len()))
        .sum();
    let properties_size = 3 + compound_header_size(1, id_size) + id_size;
    let application_properties_size = match pairs.len() {
        0 => 0,
        n => 3 + compound_header_size(2 * n, pairs_size) + pairs_size,
    };
    let data_size = 3 + variable_size(message.body.len());
    let mut encoded = Vec::with_capacity(properties_size + application_properties_size + data_size);
    encoded.extend_from_slice(&[DESCRIBED, SMALL_ULONG, PROPERTIES]);
    compound_header(&mut encoded, LIST8, LIST32, 1, id_size).ok_or_else(too_large)?;
    variable(&mut encoded, STR8, STR32, message.message_id.as_bytes()).ok_or_else(too_large)?;
    if !pairs.is_empty() {
        encoded.extend_from_slice(&[DESCRIBED, SMALL_ULONG, APPLICATION_PROPERTIES]);
        compound_header(&mut encoded, MAP8, MAP32, 2 * pairs.len(), pairs_size)
            .ok_or_else(too_large)?;
        for (key, value) in pairs {
            variable(&mut encoded, STR8, STR32, key.as_bytes()).ok_or_else(too_large)?;
            variable(&mut encoded, STR8, STR32, value.as_bytes()).ok_or_else(too_large)?;
        }
    }
    encoded.extend_from_slice(&[DESCRIBED, SMALL_ULONG, DATA]);
    variable(&mut encoded, VBIN8, VBIN32, &message.body).ok_or_else(too_large)?;
    Ok(encoded)
}

/// Longest string or binary written with a one-byte length (serde_amqp's choice, below 255).
const MAX_SHORT_VARIABLE: usize = u8::MAX as usize - 1;

/// Encoded size of a string or binary of `len` bytes: constructor, length, bytes.
fn variable_size(len: usize) -> usize {
    if len <= MAX_SHORT_VARIABLE {
        2 + len
    } else {
        5 + len
    }
}

/// A string or binary: the one-byte-length form when short, else the four-byte one.
fn variable(out: &mut Vec<u8>, short: u8, long: u8, bytes: &[u8]) -> Option<()> {
    if bytes.len() <= MAX_SHORT_VARIABLE {
        out.extend_from_slice(&[short, bytes.len() as u8]);
    } else {
        out.push(long);
        out.extend_from_slice(&u32::try_from(bytes.len()).ok()?.to_be_bytes());
    }
    out.extend_from_slice(bytes);
    Some(())
}

/// Size of a list or map header for `count` elements taking `elements` bytes.
fn compound_header_size(count: usize, elements: usize) -> usize {
    if count <= u8::MAX as usize && elements < u8::MAX as usize {
        3
    } else {
        9
    }
}

/// A list or map header: constructor, size (the bytes after it: count and elements), count;
/// the one-byte form when both fit.
fn compound_header(
    out: &mut Vec<u8>,
    short: u8,
    long: u8,
    count: usize,
    elements: usize,
) -> Option<()> {
    if compound_header_size(count, elements) == 3 {
        out.extend_from_slice(&[short, (elements + 1) as u8, count as u8]);
    } else {
        out.push(long);
        out.extend_from_slice(&u32::try_from(elements + 4).ok()?.to_be_bytes());
        out.extend_from_slice(&u32::try_from(count).ok()?.to_be_bytes());
    }
    Some(())
}

/// Encoded size of one data section holding `len` bytes, as fe2o3 writes a batch's sections:
/// descriptor (3 bytes), then the binary.
pub fn data_section_size(len: usize) -> u64 {
    3 + variable_size(len) as u64
}

/// Collects encoded messages into one batch up to the link's maximum message size. Filling
/// batches in order this way gives the fewest batches for a sequence of messages.
#[derive(Debug)]
pub struct BatchBuilder {
    max_size: u64,
    size: u64,
    messages: Vec<Vec<u8>>,
}

impl BatchBuilder {
    pub fn new(max_size: u64) -> Self {
        Self {
            max_size,
            size: 0,
            messages: Vec::new(),
        }
    }

    /// Add `encoded` if it fits. When the batch is full the message is handed back: send
    /// this batch, then add it to the next. A message that fits no batch is an error.
    pub fn try_push(&mut self, encoded: Vec<u8>) -> Result<Option<Vec<u8>>, ServiceBusError> {
        let section = data_section_size(encoded.len());
        if section > self.max_size {
            return Err(ServiceBusError::MessageTooLarge(format!(
                "a message of {} bytes does not fit the queue's limit of {} bytes",
                encoded.len(),
                self.max_size
            )));
        }
        if self.size + section > self.max_size {
            return Ok(Some(encoded));
        }
        self.size += section;
        self.messages.push(encoded);
        Ok(None)
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The collected messages; the builder starts a new, empty batch.
    pub fn take(&mut self) -> Vec<Vec<u8>> {
        self.size = 0;
        std::mem::take(&mut self.messages)
    }
}

/// Encoded messages packed into one batch transfer, built once: a retry after a reconnect
/// sends the same transfer again by reference.
pub struct OutgoingBatch {
    sendable: Sendable<Batch<Data>>,
    messages: usize,
}

impl OutgoingBatch {
    /// The encoded messages move into the batch's data sections without a copy.
    pub fn new(encoded: Vec<Vec<u8>>) -> Self {
        let messages = encoded.len();
        let sections: Vec<Data> = encoded
            .into_iter()
            .map(|bytes| Data(Binary::from(bytes)))
            .collect();
        let message = Message::builder().body(Batch::new(sections)).build();
        let sendable = Sendable::builder()
            .message(message)
            .message_format(BATCH_MESSAGE_FORMAT)
            .settled(false)
            .build();
        Self { sendable, messages }
    }

    /// How many messages the batch holds.
    pub fn messages(&self) -> usize {
        self.messages
    }
}

/// A batch on its way: the broker's answer is still to come.
pub struct PendingSend {
    delivery: DeliveryFut<Result<Outcome, SendError>>,
    context: String,
    timeout: Duration,
}

impl PendingSend {
    /// Wait for the broker's answer: `Ok` once it accepted every message of the batch.
    pub async fn outcome(self) -> Result<(), ServiceBusError> {
        let context = self.context;
        let delivery = self.delivery;
        let outcome = with_timeout("send", self.timeout, async {
            delivery
                .await
                .map_err(|err| link_errors::send(&context, &err))
        })
        .await?;
        match outcome {
            Outcome::Accepted(_) => Ok(()),
            Outcome::Rejected(rejected) => Err(match rejected.error {
                Some(error) => ServiceBusError::from_amqp(&context, &error),
                None => ServiceBusError::Protocol(format!("{context}: rejected")),
            }),
            Outcome::Released(_) => Err(ServiceBusError::ServerBusy(format!(
                "{context}: released by the broker"
            ))),
            Outcome::Modified(_) => Err(ServiceBusError::ServerBusy(format!(
                "{context}: not delivered (modified)"
            ))),
            #[allow(unreachable_patterns)]
            _ => Err(ServiceBusError::Protocol(format!(
                "{context}: unexpected outcome"
            ))),
        }
    }
}

/// A sender link on a queue, with the connection it lives on.
pub struct QueueSender {
    connection: AmqpConnection,
    link: Sender,
    queue: String,
    max_message_size: u64,
}

impl QueueSender {
    /// Connect, authorise the queue, attach a sender.
    pub async fn open(
        namespace: &Namespace,
        credentials: Arc<Credentials>,
        queue: &str,
        timeout: Duration,
    ) -> Result<Self, ServiceBusError> {
        let mut connection = AmqpConnection::open(namespace, credentials, timeout).await?;
        connection.authorize(queue).await?;
        let name = format!("{queue}-sender-{}", uuid::Uuid::new_v4());
        let link = with_timeout("attach sender", timeout, async {
            Sender::builder()
                .name(name)
                .target(queue)
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .attach(&mut connection.session)
                .await
                .map_err(|err| {
                    link_errors::sender_attach(&format!("attach sender to {queue}"), &err)
                })
        })
        .await?;
        let max_message_size = link
            .max_message_size()
            .filter(|size| *size > 0)
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        tracing::debug!(queue, max_message_size, "sender attached");
        Ok(Self {
            connection,
            link,
            queue: queue.to_string(),
            max_message_size,
        })
    }

    pub fn max_message_size(&self) -> u64 {
        self.max_message_size
    }

    /// Send a batch and wait until the broker accepted it.
    pub async fn send_batch(&mut self, batch: &OutgoingBatch) -> Result<(), ServiceBusError> {
        let pending = self.start_send(batch).await?;
        self.outcome(pending).await
    }

    /// Wait for the broker's answer to a batch started on this sender. fe2o3 keeps waiting
    /// for the outcome of a transfer whose connection the broker closed; once the session
    /// has stopped the answer can never come, so fail now instead of after the whole
    /// operation timeout.
    pub async fn outcome(&mut self, pending: PendingSend) -> Result<(), ServiceBusError> {
        let lost = format!(
            "{}: the connection was closed before the broker answered",
            pending.context
        );
        tokio::select! {
            // An answer that did arrive wins over the session's end (no needless resend).
            biased;
            answered = pending.outcome() => answered,
            _ = self.connection.session.on_end() => Err(ServiceBusError::Disconnected(lost)),
        }
    }

    /// Hand a batch to the link and return without waiting for the broker's answer, so the
    /// next batch can be built meanwhile. Await [`PendingSend::outcome`] before starting the
    /// next send: one unanswered batch at a time keeps a retry after a lost connection exact.
    pub async fn start_send(
        &mut self,
        batch: &OutgoingBatch,
    ) -> Result<PendingSend, ServiceBusError> {
        let context = format!("send to {}", self.queue);
        let timeout = self.connection.timeout;
        let delivery = with_timeout("send", timeout, async {
            self.link
                .send_batchable_ref(&batch.sendable)
                .await
                .map_err(|err| link_errors::send(&context, &err))
        })
        .await?;
        Ok(PendingSend {
            delivery,
            context,
            timeout,
        })
    }

    /// Detach and close the connection, politely but for no longer than the operation
    /// timeout: a broker that stopped answering must not hold up a resend.
    pub async fn close(self) {
        let timeout = self.connection.timeout;
        let close = async {
            if let Err(err) = self.link.close().await {
                tracing::debug!(error = %err, "sender close");
            }
            self.connection.close().await;
        };
        if tokio::time::timeout(timeout, close).await.is_err() {
            tracing::debug!("sender close timed out; dropping the connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fe2o3_amqp::types::messaging::message::__private::Serializable;
    use fe2o3_amqp::types::messaging::{ApplicationProperties, MessageId, Properties};
    use fe2o3_amqp::types::primitives::SimpleValue;

    fn message(id: usize, body_len: usize) -> OutgoingMessage {
        OutgoingMessage {
            message_id: format!("id-{id:03}"),
            body: vec![b'x'; body_len].into(),
            application_properties: vec![("source".into(), "test".into())],
        }
    }

    /// The same message as fe2o3 encodes it.
    fn fe2o3_encoding(message: &OutgoingMessage) -> Vec<u8> {
        let properties = Properties {
            message_id: Some(MessageId::String(message.message_id.clone())),
            ..Default::default()
        };
        let mut builder = Message::builder().properties(properties);
        if !message.application_properties.is_empty() {
            let mut map = ApplicationProperties::default();
            for (key, value) in &message.application_properties {
                map.as_inner_mut()
                    .insert(key.clone(), SimpleValue::String(value.clone()));
            }
            builder = builder.application_properties(map);
        }
        let amqp = builder.data(Binary::from(message.body.to_vec())).build();
        serde_amqp::to_vec(&Serializable(amqp)).expect("fe2o3 encodes")
    }

    #[test]
    fn encoding_is_byte_for_byte_what_fe2o3_writes() {
        let long = "v".repeat(300);
        let many: Vec<(String, String)> = (0..40)
            .map(|i| (format!("key-{i}"), format!("value-{i}")))
            .collect();
        let property_sets = [
            vec![],
            vec![("source".to_string(), "servicebusdemo".to_string())],
            vec![("long".to_string(), long.clone())],
            many,
        ];
        let ids: Vec<String> = ["", "id-1"]
            .into_iter()
            .map(String::from)
            .chain((250..=257).map(|len| "i".repeat(len)))
            .collect();
        for id in &ids {
            for properties in &property_sets {
                for body_len in [0, 1, 254, 255, 256, 70_000] {
                    let message = OutgoingMessage {
                        message_id: id.clone(),
                        body: vec![b'b'; body_len].into(),
                        application_properties: properties.clone(),
                    };
                    let ours = encode(&message).expect("encode");
                    assert!(
                        ours == fe2o3_encoding(&message),
                        "id {} bytes, {} properties, body {body_len}",
                        id.len(),
                        properties.len()
                    );
                    assert!(ours.capacity() == ours.len(), "one allocation, exact size");
                }
            }
        }
    }

    /// The size we compute must be the size fe2o3 puts on the wire, or a batch may be refused.
    #[test]
    fn computed_batch_size_matches_the_encoding() {
        for lens in [
            vec![10usize, 20, 30],
            vec![300, 5, 70_000],
            vec![0],
            // Encoded messages of 254, 255 and 256 bytes: the binary's length form changes.
            vec![215, 216, 217],
        ] {
            let encoded: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, len)| encode(&message(i, *len)).expect("encode"))
                .collect();
            if lens == [215, 216, 217] {
                let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
                assert_eq!(sizes, [254, 255, 256]);
            }
            let computed: u64 = encoded.iter().map(|m| data_section_size(m.len())).sum();
            let sections: Vec<Data> = encoded
                .iter()
                .map(|b| Data(Binary::from(b.clone())))
                .collect();
            let batch = Message::builder().body(Batch::new(sections)).build();
            let wire = serde_amqp::to_vec(&Serializable(batch)).expect("encode batch");
            assert_eq!(computed, wire.len() as u64, "{lens:?}");
        }
    }

    /// Split like the producer does: fill a batch until a message is handed back.
    fn pack(encoded: &[Vec<u8>], max_size: u64) -> Result<Vec<usize>, ServiceBusError> {
        let mut builder = BatchBuilder::new(max_size);
        let mut sizes = Vec::new();
        for message in encoded {
            if let Some(back) = builder.try_push(message.clone())? {
                sizes.push(builder.take().len());
                assert_eq!(builder.try_push(back)?, None, "fits an empty batch");
            }
        }
        if !builder.is_empty() {
            sizes.push(builder.take().len());
        }
        Ok(sizes)
    }

    #[test]
    fn batches_are_filled_to_the_limit() {
        let encoded: Vec<Vec<u8>> = (0..100)
            .map(|i| encode(&message(i, 100)).expect("encode"))
            .collect();
        let one = data_section_size(encoded[0].len());
        assert_eq!(pack(&encoded, 256 * 1024).expect("pack"), vec![100]);
        assert_eq!(
            pack(&encoded, one * 30).expect("pack"),
            vec![30, 30, 30, 10]
        );
        assert_eq!(
            pack(&encoded, one * 30 + one - 1).expect("pack"),
            vec![30, 30, 30, 10]
        );
        assert!(matches!(
            pack(&encoded, one - 1),
            Err(ServiceBusError::MessageTooLarge(_))
        ));
        assert!(pack(&[], 100).expect("pack").is_empty());
    }

    #[test]
    fn encoded_message_carries_id_and_properties() {
        let encoded = encode(&message(7, 3)).expect("encode");
        let text = String::from_utf8_lossy(&encoded);
        assert!(text.contains("id-007"));
        assert!(text.contains("source"));
    }
}
