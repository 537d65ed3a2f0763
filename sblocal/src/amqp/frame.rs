//! Frame layer: protocol headers, the 8-byte frame header, decoding a frame body into a
//! performative plus payload, and encoding outgoing frames into a write buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::performatives::Performative;
use fe2o3_amqp_types::primitives::{Symbol, Value};
use serde::Serialize;

use super::codec;

pub const FRAME_TYPE_AMQP: u8 = 0x00;
pub const FRAME_TYPE_SASL: u8 = 0x01;
/// The smallest max-frame-size a peer may announce (AMQP 1.0, 2.7.1).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// Protocol ids of the 8-byte protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    Amqp,
    Tls,
    Sasl,
}

impl ProtocolHeader {
    pub fn bytes(self) -> [u8; 8] {
        let id = match self {
            ProtocolHeader::Amqp => 0,
            ProtocolHeader::Tls => 2,
            ProtocolHeader::Sasl => 3,
        };
        [b'A', b'M', b'Q', b'P', id, 1, 0, 0]
    }

    /// Parses a protocol header; `None` for anything that is not AMQP 1.0.0.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [b'A', b'M', b'Q', b'P', id, 1, 0, 0] => match id {
                0 => Some(ProtocolHeader::Amqp),
                2 => Some(ProtocolHeader::Tls),
                3 => Some(ProtocolHeader::Sasl),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame size {0} is below the 8-byte header")]
    TooSmall(u32),
    #[error("frame size {size} exceeds the negotiated maximum {max}")]
    TooLarge { size: u32, max: u32 },
    #[error("data offset {0} is invalid")]
    BadDataOffset(u8),
    #[error("unexpected frame type {0}")]
    UnexpectedType(u8),
    #[error("cannot decode frame body: {0}")]
    Decode(String),
}

/// A raw frame: header fields and the body after the extended header.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub frame_type: u8,
    pub channel: u16,
    pub body: Bytes,
}

/// Takes one complete frame off the front of `buf`, or `None` when more bytes are needed.
pub fn take_frame(buf: &mut BytesMut, max_frame_size: u32) -> Result<Option<RawFrame>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if size < 8 {
        return Err(FrameError::TooSmall(size));
    }
    if size > max_frame_size {
        return Err(FrameError::TooLarge {
            size,
            max: max_frame_size,
        });
    }
    let doff = buf[4];
    let header_len = usize::from(doff) * 4;
    if doff < 2 || header_len > size as usize {
        return Err(FrameError::BadDataOffset(doff));
    }
    if buf.len() < size as usize {
        return Ok(None);
    }
    let mut frame = buf.split_to(size as usize).freeze();
    let frame_type = frame[5];
    let channel = u16::from_be_bytes([frame[6], frame[7]]);
    frame.advance(header_len);
    Ok(Some(RawFrame {
        frame_type,
        channel,
        body: frame,
    }))
}

/// A decoded AMQP frame: `None` performative for an empty (heartbeat) frame.
#[derive(Debug)]
pub struct AmqpFrame {
    pub channel: u16,
    pub performative: Option<Performative>,
    /// Bytes after the performative (a transfer's payload).
    pub payload: Bytes,
}

/// Decodes the body of an AMQP frame: the performative, and where the payload starts.
pub fn decode_amqp(frame: RawFrame) -> Result<AmqpFrame, FrameError> {
    if frame.frame_type != FRAME_TYPE_AMQP {
        return Err(FrameError::UnexpectedType(frame.frame_type));
    }
    if frame.body.is_empty() {
        return Ok(AmqpFrame {
            channel: frame.channel,
            performative: None,
            payload: Bytes::new(),
        });
    }
    let len = codec::described_len(&frame.body).map_err(|e| FrameError::Decode(e.to_string()))?;
    codec::check_nesting(&frame.body[..len], codec::MAX_NESTING)
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    let body = &frame.body[..len];
    let performative: Performative = match serde_amqp::from_slice(body) {
        Ok(performative) => performative,
        Err(e) => lenient_performative(body).ok_or_else(|| FrameError::Decode(e.to_string()))?,
    };
    Ok(AmqpFrame {
        channel: frame.channel,
        performative: Some(performative),
        payload: frame.body.slice(len..),
    })
}

/// Some clients (rhea, behind `@azure/service-bus`) write `fields` maps with string keys where
/// the specification says symbol, e.g. the dead-letter reason in a `rejected` error's info.
/// Every map inside a performative is keyed by symbols (or ulongs), so the frame is re-read
/// with string keys turned into symbols.
fn lenient_performative(body: &[u8]) -> Option<Performative> {
    let mut value: Value = serde_amqp::from_slice(body).ok()?;
    symbolise_keys(&mut value);
    let encoded = serde_amqp::to_vec(&value).ok()?;
    serde_amqp::from_slice(&encoded).ok()
}

fn symbolise_keys(value: &mut Value) {
    match value {
        Value::Described(described) => symbolise_keys(&mut described.value),
        Value::List(items) => items.iter_mut().for_each(symbolise_keys),
        Value::Array(items) => items.0.iter_mut().for_each(symbolise_keys),
        Value::Map(map) => {
            let entries: Vec<(Value, Value)> = std::mem::take(map).into_iter().collect();
            for (key, mut item) in entries {
                symbolise_keys(&mut item);
                let key = match key {
                    Value::String(name) => Value::Symbol(Symbol::from(name)),
                    other => other,
                };
                map.insert(key, item);
            }
        }
        _ => {}
    }
}

/// Appends one frame (header, encoded performative, payload) to `out`.
pub fn encode_frame<T: Serialize>(
    out: &mut BytesMut,
    frame_type: u8,
    channel: u16,
    body: &T,
    payload: &[u8],
) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u32(0); // size, patched below
    out.put_u8(2);
    out.put_u8(frame_type);
    out.put_u16(channel);
    let mut serializer = serde_amqp::ser::Serializer::from(out.writer());
    body.serialize(&mut serializer)
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    out.put_slice(payload);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(())
}

/// Appends an empty frame (a heartbeat).
pub fn encode_empty(out: &mut BytesMut) {
    out.put_u32(8);
    out.put_u8(2);
    out.put_u8(FRAME_TYPE_AMQP);
    out.put_u16(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::performatives::{Begin, Transfer};

    fn begin() -> Performative {
        Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 1,
            incoming_window: 10,
            outgoing_window: 10,
            handle_max: u32::MAX.into(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    #[test]
    fn round_trips_a_performative() {
        let mut out = BytesMut::new();
        encode_frame(&mut out, FRAME_TYPE_AMQP, 3, &begin(), &[]).expect("encode");
        let raw = take_frame(&mut out, 1024).expect("ok").expect("complete");
        assert_eq!(raw.channel, 3);
        let frame = decode_amqp(raw).expect("decode");
        assert!(matches!(frame.performative, Some(Performative::Begin(_))));
        assert!(out.is_empty());
    }

    #[test]
    fn finds_transfer_payload() {
        let transfer = Performative::Transfer(Transfer {
            handle: 0.into(),
            delivery_id: Some(0),
            delivery_tag: None,
            message_format: Some(0),
            settled: None,
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        });
        let mut out = BytesMut::new();
        encode_frame(&mut out, FRAME_TYPE_AMQP, 0, &transfer, b"payload").expect("encode");
        let frame =
            decode_amqp(take_frame(&mut out, 1024).expect("ok").expect("some")).expect("decode");
        assert_eq!(&frame.payload[..], b"payload");
    }

    #[test]
    fn waits_for_partial_frames_and_rejects_bad_sizes() {
        let mut out = BytesMut::new();
        encode_frame(&mut out, FRAME_TYPE_AMQP, 0, &begin(), &[]).expect("encode");
        let mut partial = BytesMut::from(&out[..out.len() - 1]);
        assert!(take_frame(&mut partial, 1024).expect("ok").is_none());
        assert!(matches!(
            take_frame(&mut BytesMut::from(&[0, 0, 0, 4, 2, 0, 0, 0][..]), 1024),
            Err(FrameError::TooSmall(4))
        ));
        assert!(matches!(
            take_frame(&mut BytesMut::from(&[0, 1, 0, 0, 2, 0, 0, 0][..]), 1024),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            take_frame(&mut BytesMut::from(&[0, 0, 0, 8, 1, 0, 0, 0][..]), 1024),
            Err(FrameError::BadDataOffset(1))
        ));
    }

    #[test]
    fn heartbeat_has_no_performative() {
        let mut out = BytesMut::new();
        encode_empty(&mut out);
        let frame =
            decode_amqp(take_frame(&mut out, 1024).expect("ok").expect("some")).expect("ok");
        assert!(frame.performative.is_none());
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let raw = RawFrame {
            frame_type: FRAME_TYPE_AMQP,
            channel: 0,
            body: Bytes::from_static(&[0x00, 0x53, 0x99, 0x45]),
        };
        assert!(decode_amqp(raw).is_err());
    }

    #[test]
    fn string_keyed_error_info_is_accepted() {
        // A disposition whose rejected error info uses string keys, as rhea writes it.
        let mut info = std::collections::BTreeMap::new();
        info.insert("DeadLetterReason".to_string(), "Bad".to_string());
        let error = Value::Described(Box::new(serde_amqp::described::Described {
            descriptor: serde_amqp::descriptor::Descriptor::Code(0x1d),
            value: Value::List(vec![
                Value::Symbol(Symbol::from("com.microsoft:dead-letter")),
                Value::Null,
                Value::Map(
                    info.into_iter()
                        .map(|(k, v)| (Value::String(k), Value::String(v)))
                        .collect(),
                ),
            ]),
        }));
        let rejected = Value::Described(Box::new(serde_amqp::described::Described {
            descriptor: serde_amqp::descriptor::Descriptor::Code(0x25),
            value: Value::List(vec![error]),
        }));
        let disposition = Value::Described(Box::new(serde_amqp::described::Described {
            descriptor: serde_amqp::descriptor::Descriptor::Code(0x15),
            value: Value::List(vec![
                Value::Bool(true),
                Value::Uint(3),
                Value::Null,
                Value::Bool(false),
                rejected,
            ]),
        }));
        let mut out = BytesMut::new();
        encode_frame(&mut out, FRAME_TYPE_AMQP, 0, &disposition, &[]).expect("encode");
        let frame = decode_amqp(take_frame(&mut out, 4096).expect("ok").expect("some"))
            .expect("lenient decode");
        assert!(matches!(frame.performative, Some(Performative::Disposition(d)) if d.first == 3));
    }

    #[test]
    fn protocol_headers() {
        assert_eq!(
            ProtocolHeader::parse(b"AMQP\x03\x01\x00\x00"),
            Some(ProtocolHeader::Sasl)
        );
        assert_eq!(
            ProtocolHeader::parse(b"AMQP\x00\x01\x00\x00"),
            Some(ProtocolHeader::Amqp)
        );
        assert_eq!(ProtocolHeader::parse(b"HTTP/1.1"), None);
    }
}
