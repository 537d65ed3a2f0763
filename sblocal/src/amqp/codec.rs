//! Byte-level helpers over the AMQP type system: measuring an encoded value without decoding it,
//! and splitting a message into its sections. These let the broker keep message bytes exactly as
//! the client sent them and touch only the sections it must change.

use bytes::Bytes;

/// An encoded value could not be measured: truncated or an unknown format code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("encoded value truncated")]
    Truncated,
    #[error("unknown format code 0x{0:02x}")]
    UnknownFormatCode(u8),
    #[error("unexpected encoding: {0}")]
    Unexpected(&'static str),
}

fn read_u8(buf: &[u8], at: usize) -> Result<usize, CodecError> {
    buf.get(at)
        .map(|b| usize::from(*b))
        .ok_or(CodecError::Truncated)
}

fn read_u32(buf: &[u8], at: usize) -> Result<usize, CodecError> {
    let bytes = buf.get(at..at + 4).ok_or(CodecError::Truncated)?;
    let value = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    usize::try_from(value).map_err(|_| CodecError::Truncated)
}

/// Number of bytes the encoded value at the start of `buf` occupies (format code included).
/// Nested descriptors are followed; compound contents are skipped by their size prefix.
pub fn value_len(buf: &[u8]) -> Result<usize, CodecError> {
    value_len_depth(buf, 0)
}

fn value_len_depth(buf: &[u8], depth: u8) -> Result<usize, CodecError> {
    // A described type nests a descriptor and a value; bound the nesting so hostile input
    // cannot recurse without end.
    if depth > 16 {
        return Err(CodecError::Unexpected("descriptor nesting too deep"));
    }
    let code = *buf.first().ok_or(CodecError::Truncated)?;
    let len = match code {
        0x00 => {
            let descriptor = value_len_depth(&buf[1..], depth + 1)?;
            let rest = buf.get(1 + descriptor..).ok_or(CodecError::Truncated)?;
            1 + descriptor + value_len_depth(rest, depth + 1)?
        }
        0x40..=0x45 => 1,
        0x50..=0x56 => 2,
        0x60..=0x61 => 3,
        0x70..=0x74 => 5,
        0x80..=0x84 => 9,
        0x94 => 5,
        0x98 => 17,
        0xa0..=0xa3 => 2 + read_u8(buf, 1)?,
        0xb0..=0xb3 => 5 + read_u32(buf, 1)?,
        0xc0 | 0xc1 | 0xe0 => 2 + read_u8(buf, 1)?,
        0xd0 | 0xd1 | 0xf0 => 5 + read_u32(buf, 1)?,
        other => return Err(CodecError::UnknownFormatCode(other)),
    };
    if len > buf.len() {
        return Err(CodecError::Truncated);
    }
    Ok(len)
}

/// Deepest nesting of compound values accepted before decoding. Decoders recurse per level,
/// so hostile input must not choose the depth.
pub const MAX_NESTING: u32 = 32;

/// Checks that the value at the start of `buf` nests no deeper than `max_depth`.
pub fn check_nesting(buf: &[u8], max_depth: u32) -> Result<(), CodecError> {
    walk(buf, 0, max_depth).map(|_| ())
}

fn walk(buf: &[u8], depth: u32, max_depth: u32) -> Result<usize, CodecError> {
    let code = *buf.first().ok_or(CodecError::Truncated)?;
    if code == 0x00 {
        if depth >= max_depth {
            return Err(CodecError::Unexpected("nesting too deep"));
        }
        let descriptor = walk(&buf[1..], depth + 1, max_depth)?;
        let rest = buf.get(1 + descriptor..).ok_or(CodecError::Truncated)?;
        return Ok(1 + descriptor + walk(rest, depth + 1, max_depth)?);
    }
    Ok(1 + walk_body(code, &buf[1..], depth, max_depth)?)
}

/// Walks a value's encoding after its format code.
fn walk_body(code: u8, body: &[u8], depth: u32, max_depth: u32) -> Result<usize, CodecError> {
    let (width_len, compound) = match code {
        0xc0 | 0xc1 | 0xe0 => (1, true),
        0xd0 | 0xd1 | 0xf0 => (4, true),
        _ => (0, false),
    };
    if !compound {
        return scalar_len(code, body);
    }
    if depth >= max_depth {
        return Err(CodecError::Unexpected("nesting too deep"));
    }
    let (size, count) = if width_len == 1 {
        (read_u8(body, 0)?, read_u8(body, 1)?)
    } else {
        (read_u32(body, 0)?, read_u32(body, 4)?)
    };
    let total = width_len + size;
    let contents = body
        .get(2 * width_len..total)
        .ok_or(CodecError::Truncated)?;
    if matches!(code, 0xe0 | 0xf0) {
        walk_array(contents, count, depth + 1, max_depth)?;
    } else {
        let mut at = 0;
        for _ in 0..count {
            let rest = contents.get(at..).ok_or(CodecError::Truncated)?;
            at += walk(rest, depth + 1, max_depth)?;
        }
    }
    Ok(total)
}

fn walk_array(contents: &[u8], count: usize, depth: u32, max_depth: u32) -> Result<(), CodecError> {
    let mut at = 0;
    let mut code = *contents.first().ok_or(CodecError::Truncated)?;
    at += 1;
    if code == 0x00 {
        if depth >= max_depth {
            return Err(CodecError::Unexpected("nesting too deep"));
        }
        at += walk(
            contents.get(1..).ok_or(CodecError::Truncated)?,
            depth + 1,
            max_depth,
        )?;
        code = *contents.get(at).ok_or(CodecError::Truncated)?;
        at += 1;
    }
    // Zero-width elements cannot nest; skipping them also bounds the work.
    if matches!(code, 0x40..=0x45) {
        return Ok(());
    }
    for _ in 0..count {
        let rest = contents.get(at..).ok_or(CodecError::Truncated)?;
        if rest.is_empty() {
            return Err(CodecError::Truncated);
        }
        at += walk_body(code, rest, depth, max_depth)?;
    }
    Ok(())
}

/// Bytes a non-compound value occupies after its format code.
fn scalar_len(code: u8, body: &[u8]) -> Result<usize, CodecError> {
    let len = match code {
        0x40..=0x45 => 0,
        0x50..=0x56 => 1,
        0x60..=0x61 => 2,
        0x70..=0x74 | 0x94 => 4,
        0x80..=0x84 => 8,
        0x98 => 16,
        0xa0..=0xa3 => 1 + read_u8(body, 0)?,
        0xb0..=0xb3 => 4 + read_u32(body, 0)?,
        other => return Err(CodecError::UnknownFormatCode(other)),
    };
    if len > body.len() {
        return Err(CodecError::Truncated);
    }
    Ok(len)
}

/// The length of a described list (a performative or SASL frame body) at the start of `buf`.
pub fn described_len(buf: &[u8]) -> Result<usize, CodecError> {
    if buf.first() != Some(&0x00) {
        return Err(CodecError::Unexpected("expected a described type"));
    }
    value_len(buf)
}

/// The numeric descriptor of the described value at the start of `buf`, when it has one.
pub fn descriptor_code(buf: &[u8]) -> Option<u64> {
    match (buf.first()?, buf.get(1)?) {
        (0x00, 0x53) => buf.get(2).map(|b| u64::from(*b)),
        (0x00, 0x80) => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        }
        _ => None,
    }
}

/// Section descriptors of a message (AMQP 1.0, part 3.2).
pub mod section {
    pub const HEADER: u64 = 0x70;
    pub const DELIVERY_ANNOTATIONS: u64 = 0x71;
    pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
    pub const PROPERTIES: u64 = 0x73;
    pub const APPLICATION_PROPERTIES: u64 = 0x74;
    pub const DATA: u64 = 0x75;
    pub const AMQP_SEQUENCE: u64 = 0x76;
    pub const AMQP_VALUE: u64 = 0x77;
    pub const FOOTER: u64 = 0x78;
}

/// One section of an encoded message: its descriptor and its complete bytes (descriptor included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub code: u64,
    pub bytes: Bytes,
}

impl Section {
    /// The encoded value after the descriptor.
    pub fn value(&self) -> Result<&[u8], CodecError> {
        let descriptor = value_len(self.bytes.get(1..).ok_or(CodecError::Truncated)?)?;
        self.bytes
            .get(1 + descriptor..)
            .ok_or(CodecError::Truncated)
    }
}

/// Splits an encoded message into its sections, in order, without copying.
pub fn split_sections(message: &Bytes) -> Result<Vec<Section>, CodecError> {
    let mut sections = Vec::with_capacity(6);
    let mut at = 0;
    while at < message.len() {
        let rest = &message[at..];
        let code =
            descriptor_code(rest).ok_or(CodecError::Unexpected("section without descriptor"))?;
        if !(section::HEADER..=section::FOOTER).contains(&code) {
            return Err(CodecError::Unexpected("unknown message section"));
        }
        let len = value_len(rest)?;
        sections.push(Section {
            code,
            bytes: message.slice(at..at + len),
        });
        at += len;
    }
    Ok(sections)
}

/// The payload of a binary value (`vbin8`/`vbin32`) at the start of `buf`.
pub fn binary_payload(buf: &[u8]) -> Result<std::ops::Range<usize>, CodecError> {
    match buf.first() {
        Some(0xa0) => {
            let len = read_u8(buf, 1)?;
            check_range(buf, 2, len)
        }
        Some(0xb0) => {
            let len = read_u32(buf, 1)?;
            check_range(buf, 5, len)
        }
        _ => Err(CodecError::Unexpected("expected binary")),
    }
}

fn check_range(buf: &[u8], start: usize, len: usize) -> Result<std::ops::Range<usize>, CodecError> {
    if start + len > buf.len() {
        return Err(CodecError::Truncated);
    }
    Ok(start..start + len)
}

/// The entries of an encoded map (`map8`/`map32`, or `null` for none) and their count (keys plus values).
pub fn map_entries(buf: &[u8]) -> Result<(&[u8], u32), CodecError> {
    match buf.first() {
        Some(0x40) => Ok((&[], 0)),
        Some(0xc1) => {
            let size = read_u8(buf, 1)?;
            let count = read_u8(buf, 2)?;
            let body = buf.get(3..2 + size).ok_or(CodecError::Truncated)?;
            Ok((body, count as u32))
        }
        Some(0xd1) => {
            let size = read_u32(buf, 1)?;
            let count = read_u32(buf, 5)?;
            let body = buf.get(9..5 + size).ok_or(CodecError::Truncated)?;
            Ok((
                body,
                u32::try_from(count).map_err(|_| CodecError::Truncated)?,
            ))
        }
        _ => Err(CodecError::Unexpected("expected a map")),
    }
}

/// Appends a `symbol` key.
pub fn put_symbol(out: &mut Vec<u8>, symbol: &str) {
    // Keys we write are short constants; sym8 always fits.
    out.push(0xa3);
    out.push(symbol.len() as u8);
    out.extend_from_slice(symbol.as_bytes());
}

/// Appends a `long`.
pub fn put_long(out: &mut Vec<u8>, value: i64) {
    out.push(0x81);
    out.extend_from_slice(&value.to_be_bytes());
}

/// Appends a `timestamp` (milliseconds since the Unix epoch).
pub fn put_timestamp(out: &mut Vec<u8>, millis: i64) {
    out.push(0x83);
    out.extend_from_slice(&millis.to_be_bytes());
}

/// Appends a `uuid`.
pub fn put_uuid(out: &mut Vec<u8>, uuid: &[u8; 16]) {
    out.push(0x98);
    out.extend_from_slice(uuid);
}

/// Appends a `string`.
pub fn put_string(out: &mut Vec<u8>, value: &str) {
    if value.len() <= 255 {
        out.push(0xa1);
        out.push(value.len() as u8);
    } else {
        out.push(0xb1);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(value.as_bytes());
}

/// Appends a message-annotations section from already-encoded map entries.
pub fn put_annotations_section(out: &mut Vec<u8>, entries: &[&[u8]], count: u32) {
    out.extend_from_slice(&[0x00, 0x53, section::MESSAGE_ANNOTATIONS as u8, 0xd1]);
    let body_len: usize = entries.iter().map(|e| e.len()).sum();
    // map32 size counts the count field (4 bytes) plus the entries.
    out.extend_from_slice(&((body_len + 4) as u32).to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for entry in entries {
        out.extend_from_slice(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::message::__private::Serializable;
    use fe2o3_amqp_types::messaging::{Message, Properties};
    use fe2o3_amqp_types::primitives::Binary;

    fn encoded(message: Message<fe2o3_amqp_types::messaging::Data>) -> Bytes {
        Bytes::from(serde_amqp::to_vec(&Serializable(message)).unwrap_or_default())
    }

    #[test]
    fn measures_fixed_and_variable_width_values() {
        assert_eq!(value_len(&[0x40]), Ok(1));
        assert_eq!(value_len(&[0x52, 7]), Ok(2));
        assert_eq!(value_len(&[0xa1, 3, b'a', b'b', b'c', 0xff]), Ok(5));
        assert_eq!(value_len(&[0xa1, 3, b'a']), Err(CodecError::Truncated));
        assert_eq!(
            value_len(&[0xb0, 0xff, 0xff, 0xff, 0xff]),
            Err(CodecError::Truncated)
        );
        assert_eq!(value_len(&[0x33]), Err(CodecError::UnknownFormatCode(0x33)));
        assert_eq!(value_len(&[]), Err(CodecError::Truncated));
    }

    #[test]
    fn nesting_is_bounded() {
        // list8 inside list8 inside ... 100 deep.
        let mut deep = Vec::new();
        for _ in 0..100 {
            deep.extend_from_slice(&[0xc0, 0, 1]);
        }
        deep.push(0x40);
        let len = deep.len();
        for level in 0..100 {
            let size = len - level * 3 - 2;
            deep[level * 3 + 1] = size.min(255) as u8;
        }
        assert!(check_nesting(&deep, MAX_NESTING).is_err());
        assert!(check_nesting(&[0xc0, 0x03, 0x02, 0x40, 0x41], MAX_NESTING).is_ok());
        // An array of 2^31 nulls is refused work-free, not iterated.
        assert!(check_nesting(
            &[0xf0, 0, 0, 0, 5, 0x7f, 0xff, 0xff, 0xff, 0x40],
            MAX_NESTING
        )
        .is_ok());
        // An array of lists is walked element by element.
        let array_of_lists = [0xe0, 0x07, 0x02, 0xc0, 0x02, 0x01, 0x40, 0x01, 0x00];
        assert!(check_nesting(&array_of_lists, MAX_NESTING).is_ok());
    }

    #[test]
    fn bounded_descriptor_nesting() {
        let hostile = vec![0x00; 64];
        assert!(value_len(&hostile).is_err());
    }

    #[test]
    fn splits_sections_and_finds_data() {
        let message = Message::builder()
            .properties(Properties::builder().message_id(String::from("m1")).build())
            .data(Binary::from(vec![1u8, 2, 3]))
            .build();
        let bytes = encoded(message);
        let sections = split_sections(&bytes).expect("sections");
        let codes: Vec<u64> = sections.iter().map(|s| s.code).collect();
        assert_eq!(codes, vec![section::PROPERTIES, section::DATA]);
        let data = sections[1].value().expect("value");
        let range = binary_payload(data).expect("binary");
        assert_eq!(&data[range], &[1, 2, 3]);
    }

    #[test]
    fn rejects_garbage_sections() {
        assert!(split_sections(&Bytes::from_static(&[0x00, 0x53, 0x10, 0x40])).is_err());
        assert!(split_sections(&Bytes::from_static(&[0x41])).is_err());
    }

    #[test]
    fn annotations_section_decodes_with_serde_amqp() {
        let mut key = Vec::new();
        put_symbol(&mut key, "x-opt-sequence-number");
        put_long(&mut key, 42);
        let mut out = Vec::new();
        put_annotations_section(&mut out, &[&key], 2);
        let decoded: fe2o3_amqp_types::messaging::MessageAnnotations =
            serde_amqp::from_slice(&out).expect("decodes");
        assert_eq!(decoded.0.len(), 1);
    }
}
