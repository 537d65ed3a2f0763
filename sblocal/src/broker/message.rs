//! A stored message: the client's bytes split into sections once at enqueue, so a delivery only
//! writes a fresh header and message annotations in front of the untouched rest.

use bytes::Bytes;
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Header, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::SimpleValue;
use fe2o3_amqp_types::primitives::Value;

use crate::amqp::codec::{self, section, CodecError};

/// Annotation keys Service Bus adds to every delivered message.
pub const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
pub const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
pub const LOCKED_UNTIL: &str = "x-opt-locked-until";
pub const LOCK_TOKEN: &str = "x-opt-lock-token";
pub const DEAD_LETTER_SOURCE: &str = "x-opt-deadletter-source";
pub const SCHEDULED_ENQUEUE_TIME: &str = "x-opt-scheduled-enqueue-time";
/// Application properties Service Bus sets on dead-lettered messages.
pub const DEAD_LETTER_REASON: &str = "DeadLetterReason";
pub const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

/// The parts of a message the broker keeps. Cheap to clone: every byte field is shared.
#[derive(Debug, Clone)]
pub struct MessageParts {
    pub durable: bool,
    pub priority: u8,
    pub ttl_ms: Option<u32>,
    /// The client's message-annotation entries, encoded, and their count (keys plus values).
    pub annotations: Bytes,
    pub annotation_count: u32,
    /// Properties section as sent (or empty).
    pub properties: Bytes,
    /// Application-properties section as sent (or empty).
    pub application_properties: Bytes,
    /// Body sections and footer as sent.
    pub body: Bytes,
    /// When the sender asked for the message to appear (ms since the epoch).
    pub scheduled_enqueue_ms: Option<i64>,
}

impl MessageParts {
    /// Splits an encoded message. Delivery annotations are dropped: they are hop-by-hop.
    pub fn parse(message: &Bytes) -> Result<Self, CodecError> {
        let mut parts = MessageParts {
            durable: false,
            priority: 4,
            ttl_ms: None,
            annotations: Bytes::new(),
            annotation_count: 0,
            properties: Bytes::new(),
            application_properties: Bytes::new(),
            body: Bytes::new(),
            scheduled_enqueue_ms: None,
        };
        let sections = codec::split_sections(message)?;
        let mut body_start = None;
        let mut offset = 0usize;
        for section in &sections {
            match section.code {
                section::HEADER => {
                    let header: Header = serde_amqp::from_slice(&section.bytes)
                        .map_err(|_| CodecError::Unexpected("bad header section"))?;
                    parts.durable = header.durable;
                    parts.priority = header.priority.0;
                    parts.ttl_ms = header.ttl;
                }
                section::DELIVERY_ANNOTATIONS => {}
                section::MESSAGE_ANNOTATIONS => {
                    let value = section.value()?;
                    let (entries, count) = codec::map_entries(value)?;
                    parts.annotations = section.bytes.slice_ref(entries);
                    parts.annotation_count = count;
                    parts.scheduled_enqueue_ms = scheduled_time(&section.bytes, entries);
                }
                section::PROPERTIES => parts.properties = section.bytes.clone(),
                section::APPLICATION_PROPERTIES => {
                    parts.application_properties = section.bytes.clone()
                }
                _ => {
                    if body_start.is_none() {
                        body_start = Some(offset);
                    }
                }
            }
            offset += section.bytes.len();
        }
        if let Some(start) = body_start {
            parts.body = message.slice(start..);
        }
        parts.ensure_message_id()?;
        Ok(parts)
    }

    /// Service Bus gives a message without a message-id one of its own (clients rely on it,
    /// e.g. to track lock renewal). Only then is the properties section re-encoded.
    fn ensure_message_id(&mut self) -> Result<(), CodecError> {
        let mut properties = if self.properties.is_empty() {
            Properties::default()
        } else {
            match serde_amqp::from_slice::<Properties>(&self.properties) {
                Ok(properties) if properties.message_id.is_none() => properties,
                // Present, or in a shape we do not decode: keep the client's bytes.
                _ => return Ok(()),
            }
        };
        properties.message_id = Some(MessageId::String(uuid::Uuid::new_v4().simple().to_string()));
        let encoded = serde_amqp::to_vec(&properties)
            .map_err(|_| CodecError::Unexpected("cannot encode properties"))?;
        self.properties = Bytes::from(encoded);
        Ok(())
    }

    /// Encoded size as stored (what `SizeInBytes` counts).
    pub fn size(&self) -> usize {
        self.annotations.len()
            + self.properties.len()
            + self.application_properties.len()
            + self.body.len()
    }

    /// A copy with the dead-letter reason and description added to the application properties.
    pub fn dead_lettered(&self, reason: Option<&str>, description: Option<&str>) -> Self {
        let mut props: ApplicationProperties = if self.application_properties.is_empty() {
            ApplicationProperties::default()
        } else {
            serde_amqp::from_slice(&self.application_properties).unwrap_or_default()
        };
        if let Some(reason) = reason {
            props.0.insert(
                DEAD_LETTER_REASON.to_string(),
                SimpleValue::String(reason.to_string()),
            );
        }
        if let Some(description) = description {
            props.0.insert(
                DEAD_LETTER_DESCRIPTION.to_string(),
                SimpleValue::String(description.to_string()),
            );
        }
        let mut copy = self.clone();
        if let Ok(encoded) = serde_amqp::to_vec(&props) {
            copy.application_properties = Bytes::from(encoded);
        }
        copy
    }
}

/// The scheduled enqueue time, decoding the annotations only when the key is present.
fn scheduled_time(section_bytes: &[u8], entries: &[u8]) -> Option<i64> {
    let key = SCHEDULED_ENQUEUE_TIME.as_bytes();
    if !entries.windows(key.len()).any(|window| window == key) {
        return None;
    }
    codec::check_nesting(section_bytes, codec::MAX_NESTING).ok()?;
    let annotations: MessageAnnotations = serde_amqp::from_slice(section_bytes).ok()?;
    annotations
        .0
        .iter()
        .find_map(|(name, value)| match (name, value) {
            (OwnedKey::Symbol(symbol), Value::Timestamp(at))
                if symbol.as_str() == SCHEDULED_ENQUEUE_TIME =>
            {
                Some(at.milliseconds())
            }
            _ => None,
        })
}

/// What a delivery says about the broker's view of the message.
#[derive(Debug, Clone)]
pub struct DeliveryInfo<'a> {
    pub sequence_number: i64,
    pub enqueued_ms: i64,
    pub delivery_count: u32,
    /// Lock token (standard byte order) and lock expiry in ms, for peek-lock deliveries.
    pub lock: Option<([u8; 16], i64)>,
    pub dead_letter_source: Option<&'a str>,
}

/// Encodes the message as delivered: header, message annotations, then the stored sections.
pub fn encode_delivery(parts: &MessageParts, info: &DeliveryInfo<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.size() + 160);
    put_header(&mut out, parts, info.delivery_count);
    let mut extra = Vec::with_capacity(128);
    let mut count = parts.annotation_count;
    codec::put_symbol(&mut extra, SEQUENCE_NUMBER);
    codec::put_long(&mut extra, info.sequence_number);
    codec::put_symbol(&mut extra, ENQUEUED_TIME);
    codec::put_timestamp(&mut extra, info.enqueued_ms);
    count += 4;
    if let Some((token, locked_until)) = &info.lock {
        codec::put_symbol(&mut extra, LOCKED_UNTIL);
        codec::put_timestamp(&mut extra, *locked_until);
        codec::put_symbol(&mut extra, LOCK_TOKEN);
        codec::put_uuid(&mut extra, token);
        count += 4;
    }
    if let Some(source) = info.dead_letter_source {
        codec::put_symbol(&mut extra, DEAD_LETTER_SOURCE);
        codec::put_string(&mut extra, source);
        count += 2;
    }
    codec::put_annotations_section(&mut out, &[&parts.annotations, &extra], count);
    out.extend_from_slice(&parts.properties);
    out.extend_from_slice(&parts.application_properties);
    out.extend_from_slice(&parts.body);
    out
}

fn put_header(out: &mut Vec<u8>, parts: &MessageParts, delivery_count: u32) {
    let mut fields = Vec::with_capacity(16);
    fields.push(if parts.durable { 0x41 } else { 0x42 });
    fields.extend_from_slice(&[0x50, parts.priority]);
    match parts.ttl_ms {
        Some(ttl) => {
            fields.push(0x70);
            fields.extend_from_slice(&ttl.to_be_bytes());
        }
        None => fields.push(0x40),
    }
    fields.push(0x42); // first-acquirer
    fields.push(0x70);
    fields.extend_from_slice(&delivery_count.to_be_bytes());
    out.extend_from_slice(&[0x00, 0x53, section::HEADER as u8, 0xc0]);
    out.push((fields.len() + 1) as u8);
    out.push(5);
    out.extend_from_slice(&fields);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{
        message::__private::{Deserializable, Serializable},
        message::Body,
        Data, Message, MessageAnnotations, Properties,
    };
    use fe2o3_amqp_types::primitives::{Binary, Value};

    fn sample() -> Bytes {
        let message = Message::builder()
            .header(Header {
                durable: true,
                priority: 4.into(),
                ttl: Some(60_000),
                first_acquirer: false,
                delivery_count: 0,
            })
            .message_annotations(
                MessageAnnotations::builder()
                    .insert("x-opt-partition-key", "pk")
                    .build(),
            )
            .properties(
                Properties::builder()
                    .message_id(String::from("id-1"))
                    .build(),
            )
            .data(Binary::from(b"hello".to_vec()))
            .build();
        Bytes::from(serde_amqp::to_vec(&Serializable(message)).unwrap_or_default())
    }

    #[test]
    fn delivery_keeps_client_sections_and_adds_annotations() {
        let parts = MessageParts::parse(&sample()).expect("parse");
        assert_eq!(parts.ttl_ms, Some(60_000));
        assert_eq!(parts.annotation_count, 2);
        let info = DeliveryInfo {
            sequence_number: 7,
            enqueued_ms: 1_700_000_000_000,
            delivery_count: 2,
            lock: Some(([9; 16], 1_700_000_060_000)),
            dead_letter_source: None,
        };
        let encoded = encode_delivery(&parts, &info);
        let Deserializable(message): Deserializable<Message<Body<Value>>> =
            serde_amqp::from_slice(&encoded).expect("decodes");
        let header = message.header.expect("header");
        assert_eq!(header.delivery_count, 2);
        assert!(header.durable);
        let annotations = message.message_annotations.expect("annotations");
        assert_eq!(annotations.0.len(), 5);
        let properties = message.properties.expect("properties");
        assert_eq!(
            properties.message_id,
            Some(fe2o3_amqp_types::messaging::MessageId::String(
                "id-1".into()
            ))
        );
        match message.body {
            Body::Data(batch) => {
                let data: &Data = batch.first().expect("one data section");
                assert_eq!(data.0.as_slice(), b"hello");
            }
            other => panic!("unexpected body {other:?}"),
        }
    }

    #[test]
    fn dead_letter_adds_reason_and_description() {
        let parts = MessageParts::parse(&sample()).expect("parse");
        let dead = parts.dead_lettered(Some("why"), Some("details"));
        let props: ApplicationProperties =
            serde_amqp::from_slice(&dead.application_properties).expect("decodes");
        assert_eq!(
            props.0.get(DEAD_LETTER_REASON),
            Some(&SimpleValue::String("why".into()))
        );
        assert_eq!(
            props.0.get(DEAD_LETTER_DESCRIPTION),
            Some(&SimpleValue::String("details".into()))
        );
    }
}
