//! One client connection's view of the broker: its links, its `$cbs` grants, and the
//! request/response nodes (`$cbs`, `<entity>/$management`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fe2o3_amqp_types::definitions::{
    AmqpError, Error, ErrorCondition, Fields, LinkError, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::{
    message::__private::{Deserializable, Serializable},
    message::Body,
    Accepted, AmqpValue, ApplicationProperties, DeliveryState, Message, MessageId, Properties,
    Rejected, Released,
};
use fe2o3_amqp_types::performatives::Attach;
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Symbol, Value};
use tokio::sync::Notify;

use super::address::{self, Entity, Node};
use super::message::MessageParts;
use super::queue::{LockError, Queue, ReceiveMode, SubQueueKind};
use super::Broker;
use crate::amqp::codec::{self, section};
use crate::amqp::{AttachAccept, Handler, IncomingMessage, LinkKey, OutgoingMessage};
use crate::auth::{Grant, Rights};

/// Service Bus batch message format: the body's data sections are complete messages.
pub const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;
/// Largest message (and batch) the broker accepts, Service Bus standard tier's limit.
pub const MAX_MESSAGE_SIZE: u64 = 256 * 1024;

/// Shared between a connection and the broker's registry: lets fault switches reach it.
pub struct ConnectionControl {
    pub wake: Arc<Notify>,
    pub kill: AtomicBool,
}

enum LinkRole {
    CbsRequests,
    CbsReplies(VecDeque<Vec<u8>>),
    ManagementRequests {
        entity: Entity,
        queue: Arc<Queue>,
    },
    ManagementReplies {
        entity: Entity,
        pending: VecDeque<Vec<u8>>,
    },
    Sender {
        entity: Entity,
        queue: Arc<Queue>,
    },
    Receiver {
        entity: Entity,
        queue: Arc<Queue>,
        mode: ReceiveMode,
    },
}

impl LinkRole {
    /// For a link that sends to or receives from an entity (the ones a grant authorises):
    /// the entity, and whether the client sends.
    fn entity_link(&self) -> Option<(&Entity, bool)> {
        match self {
            LinkRole::Sender { entity, .. } => Some((entity, true)),
            LinkRole::Receiver { entity, .. } => Some((entity, false)),
            _ => None,
        }
    }
}

pub struct BrokerConnection {
    broker: Arc<Broker>,
    control: Arc<ConnectionControl>,
    links: HashMap<LinkKey, LinkRole>,
    /// `$cbs` grants by the entity path they were put for.
    grants: Vec<(String, Grant)>,
    next_tag: u64,
}

/// An error with all three fields present: pyamqp indexes condition, description and info
/// positionally and fails on a shorter list.
fn error(condition: impl Into<ErrorCondition>, description: impl Into<String>) -> Error {
    Error::new(condition, Some(description.into()), Some(Fields::default()))
}

fn vendor_error(condition: &str, description: impl Into<String>) -> Error {
    error(ErrorCondition::Custom(Symbol::from(condition)), description)
}

fn kind(entity: &Entity) -> SubQueueKind {
    if entity.dead_letter {
        SubQueueKind::DeadLetter
    } else {
        SubQueueKind::Main
    }
}

/// Lock tokens travel as delivery tags in the byte order .NET's `Guid` uses (clients read them
/// as little-endian UUIDs); annotations and `$management` use standard UUID bytes.
pub fn tag_from_token(token: &[u8; 16]) -> Vec<u8> {
    let mut tag = token.to_vec();
    tag[0..4].reverse();
    tag[4..6].reverse();
    tag[6..8].reverse();
    tag
}

pub fn token_from_tag(tag: &[u8]) -> Option<[u8; 16]> {
    let mut token: [u8; 16] = tag.try_into().ok()?;
    token[0..4].reverse();
    token[4..6].reverse();
    token[6..8].reverse();
    Some(token)
}

impl BrokerConnection {
    pub fn new(broker: Arc<Broker>, control: Arc<ConnectionControl>) -> Self {
        Self {
            broker,
            control,
            links: HashMap::new(),
            grants: Vec::new(),
            next_tag: 0,
        }
    }

    fn next_tag(&mut self) -> Vec<u8> {
        self.next_tag += 1;
        self.next_tag.to_be_bytes().to_vec()
    }

    /// The rights the connection's live grants give on `path`.
    fn rights(&self, path: &str) -> Rights {
        let now = SystemTime::now();
        let mut rights = Rights::default();
        for (granted, grant) in &self.grants {
            if grant.expires_at > now && address::covers(granted, path) {
                rights.send |= grant.rights.send;
                rights.listen |= grant.rights.listen;
                rights.manage |= grant.rights.manage;
            }
        }
        rights
    }

    fn require(&self, entity: &Entity, send: bool) -> Result<(), Error> {
        let rights = self.rights(&entity.path());
        let allowed = if send {
            rights.send || rights.manage
        } else {
            rights.listen || rights.manage
        };
        if allowed {
            Ok(())
        } else {
            let claim = if send { "Send" } else { "Listen" };
            Err(error(
                AmqpError::UnauthorizedAccess,
                format!("Unauthorized access. '{claim}' claim(s) are required to perform this operation. Resource: '{}'.", entity.path()),
            ))
        }
    }

    fn queue(&self, entity: &Entity) -> Result<Arc<Queue>, Error> {
        self.broker.queue(&entity.queue).ok_or_else(|| {
            error(
                AmqpError::NotFound,
                format!(
                    "The messaging entity '{}' could not be found.",
                    entity.path()
                ),
            )
        })
    }

    fn on_attach(&mut self, key: LinkKey, attach: &Attach) -> Result<AttachAccept, Error> {
        let client_sends = attach.role == Role::Sender;
        let address = if client_sends {
            attach.target.as_ref().and_then(|t| match t.as_ref() {
                fe2o3_amqp_types::messaging::TargetArchetype::Target(target) => {
                    target.address.clone()
                }
                #[allow(unreachable_patterns)]
                _ => None,
            })
        } else {
            attach.source.as_ref().and_then(|s| s.address.clone())
        };
        let address =
            address.ok_or_else(|| error(AmqpError::InvalidField, "The link has no address."))?;
        let node = address::parse_node(&address).ok_or_else(|| {
            error(
                AmqpError::NotFound,
                format!(
                    "The messaging entity '{}' could not be found.",
                    address::entity_path(&address)
                ),
            )
        })?;
        let mut accept = AttachAccept::default();
        let role = match node {
            Node::Cbs if client_sends => LinkRole::CbsRequests,
            Node::Cbs => LinkRole::CbsReplies(VecDeque::new()),
            Node::Management(entity) => {
                let queue = self.queue(&entity)?;
                if client_sends {
                    LinkRole::ManagementRequests { entity, queue }
                } else {
                    LinkRole::ManagementReplies {
                        entity,
                        pending: VecDeque::new(),
                    }
                }
            }
            Node::Entity(entity) => {
                let queue = self.queue(&entity)?;
                if client_sends {
                    if entity.dead_letter {
                        return Err(error(
                            AmqpError::NotAllowed,
                            "Cannot send to a dead-letter queue.",
                        ));
                    }
                    self.require(&entity, true)?;
                    accept.max_message_size = Some(MAX_MESSAGE_SIZE);
                    let mut properties = Fields::default();
                    properties.insert(
                        Symbol::from("com.microsoft:max-message-batch-size"),
                        Value::Ulong(MAX_MESSAGE_SIZE),
                    );
                    accept.properties = Some(properties);
                    LinkRole::Sender { entity, queue }
                } else {
                    self.require(&entity, false)?;
                    let mode = if attach.snd_settle_mode == SenderSettleMode::Settled {
                        ReceiveMode::ReceiveAndDelete
                    } else {
                        ReceiveMode::PeekLock
                    };
                    accept.max_message_size = Some(MAX_MESSAGE_SIZE);
                    LinkRole::Receiver {
                        entity,
                        queue,
                        mode,
                    }
                }
            }
        };
        self.links.insert(key, role);
        Ok(accept)
    }

    fn on_send(
        &mut self,
        entity: &Entity,
        queue: &Arc<Queue>,
        message: IncomingMessage,
    ) -> Result<Option<DeliveryState>, Error> {
        self.require(entity, true)?;
        if self.broker.is_busy() {
            return Ok(Some(rejected(vendor_error(
                "com.microsoft:server-busy",
                "The server is busy. Please retry the operation.",
            ))));
        }
        match parse_messages(&message) {
            Ok(parts) => {
                queue.enqueue(parts);
                Ok(Some(DeliveryState::Accepted(Accepted {})))
            }
            Err(description) => Ok(Some(rejected(error(AmqpError::DecodeError, description)))),
        }
    }

    fn on_cbs_request(&mut self, message: IncomingMessage) {
        if self.broker.cbs_is_silent() {
            tracing::debug!("fault: $cbs request left unanswered");
            return;
        }
        let Some(request) = decode_request(&message.payload) else {
            return;
        };
        let operation = app_property(&request, "operation");
        let name = app_property(&request, "name").unwrap_or_default();
        let token = match &request.body {
            Body::Value(AmqpValue(Value::String(token))) => token.clone(),
            _ => String::new(),
        };
        let path = address::entity_path(&name).to_string();
        let (status, description) = if operation.as_deref() != Some("put-token") {
            (400, "Unsupported operation.".to_string())
        } else {
            match self.broker.validator().validate(&token, &path) {
                Ok(grant) => {
                    self.grants
                        .retain(|(granted, _)| !granted.eq_ignore_ascii_case(&path));
                    self.grants.push((path, grant));
                    (202, "Accepted".to_string())
                }
                Err(e) => (401, format!("Unauthorized: {e}")),
            }
        };
        let reply = reply_message(
            &request,
            "status-code",
            "status-description",
            status,
            &description,
            Value::Null,
        );
        if let Some(LinkRole::CbsReplies(pending)) = self
            .links
            .values_mut()
            .find(|role| matches!(role, LinkRole::CbsReplies(_)))
        {
            pending.push_back(reply);
        }
    }

    fn on_management_request(
        &mut self,
        entity: &Entity,
        queue: &Arc<Queue>,
        message: IncomingMessage,
    ) {
        let Some(request) = decode_request(&message.payload) else {
            return;
        };
        let operation = app_property(&request, "operation").unwrap_or_default();
        let body = match &request.body {
            Body::Value(AmqpValue(value)) => value.clone(),
            _ => Value::Null,
        };
        // Scheduling is a send; everything else on `$management` acts on received messages.
        let sends = matches!(
            operation.as_str(),
            "com.microsoft:schedule-message" | "com.microsoft:cancel-scheduled-message"
        );
        let (status, description, value) = match self.require(entity, sends) {
            Err(e) => (401, e.description.unwrap_or_default(), Value::Null),
            Ok(()) => management_operation(queue, kind(entity), &operation, &body),
        };
        let mut reply = reply_message(
            &request,
            "statusCode",
            "statusDescription",
            status,
            &description,
            value,
        );
        if status >= 400 {
            // Keep the error condition next to the status, where clients look for it.
            reply = reply_with_condition(&request, status, &description);
        }
        let target = self.links.values_mut().find(
            |role| matches!(role, LinkRole::ManagementReplies { entity: e, .. } if e == entity),
        );
        if let Some(LinkRole::ManagementReplies { pending, .. }) = target {
            pending.push_back(reply);
        }
    }

    fn on_settle(
        &mut self,
        queue: &Arc<Queue>,
        entity: &Entity,
        tag: &[u8],
        state: Option<DeliveryState>,
    ) -> Option<DeliveryState> {
        let token = token_from_tag(tag)?;
        let kind = kind(entity);
        let state = state?;
        let (result, echo) = match state {
            DeliveryState::Accepted(_) => (
                queue.complete(kind, &token),
                DeliveryState::Accepted(Accepted {}),
            ),
            DeliveryState::Released(_) => (
                queue.abandon(kind, &token, false),
                DeliveryState::Released(Released {}),
            ),
            DeliveryState::Modified(modified) => {
                let result = if modified.undeliverable_here == Some(true) {
                    queue.defer(kind, &token)
                } else {
                    queue.abandon(kind, &token, true)
                };
                (result, DeliveryState::Modified(modified))
            }
            DeliveryState::Rejected(rejected) => {
                let info = rejected.error.as_ref().and_then(|e| e.info.as_deref());
                let reason = info.and_then(|i| field_string(i, "DeadLetterReason"));
                let description = info.and_then(|i| field_string(i, "DeadLetterErrorDescription"));
                (
                    queue.dead_letter(kind, &token, reason.as_deref(), description.as_deref()),
                    DeliveryState::Rejected(Rejected { error: None }),
                )
            }
            _ => return None,
        };
        Some(match result {
            Ok(()) => echo,
            Err(LockError::LockLost) => rejected(vendor_error(
                "com.microsoft:message-lock-lost",
                LockError::LockLost.to_string(),
            )),
        })
    }
}

fn rejected(error: Error) -> DeliveryState {
    DeliveryState::Rejected(Rejected { error: Some(error) })
}

fn field_string(fields: &Fields, key: &str) -> Option<String> {
    match fields.get(&Symbol::from(key)) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Symbol(s)) => Some(s.0.clone()),
        _ => None,
    }
}

/// The messages a transfer carries: itself, or the messages of a batch.
fn parse_messages(message: &IncomingMessage) -> Result<Vec<MessageParts>, String> {
    if message.message_format != BATCH_MESSAGE_FORMAT {
        let parts =
            MessageParts::parse(&message.payload).map_err(|e| format!("Malformed message: {e}"))?;
        return Ok(vec![parts]);
    }
    let sections =
        codec::split_sections(&message.payload).map_err(|e| format!("Malformed batch: {e}"))?;
    let mut messages = Vec::new();
    for batch_section in sections.iter().filter(|s| s.code == section::DATA) {
        let value = batch_section
            .value()
            .map_err(|e| format!("Malformed batch: {e}"))?;
        let range = codec::binary_payload(value).map_err(|e| format!("Malformed batch: {e}"))?;
        let inner: Bytes = batch_section.bytes.slice_ref(&value[range]);
        messages.push(
            MessageParts::parse(&inner).map_err(|e| format!("Malformed message in batch: {e}"))?,
        );
    }
    Ok(messages)
}

fn decode_request(payload: &[u8]) -> Option<Message<Body<Value>>> {
    let sections = codec::split_sections(&Bytes::copy_from_slice(payload)).ok()?;
    for request_section in &sections {
        codec::check_nesting(&request_section.bytes, codec::MAX_NESTING).ok()?;
    }
    serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(payload)
        .ok()
        .map(|d| d.0)
}

fn app_property(message: &Message<Body<Value>>, key: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

fn reply_properties(request: &Message<Body<Value>>) -> Properties {
    let request_id = request
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    Properties {
        correlation_id: request_id.or(Some(MessageId::Ulong(0))),
        ..Properties::default()
    }
}

fn reply_message(
    request: &Message<Body<Value>>,
    status_key: &str,
    description_key: &str,
    status: i32,
    description: &str,
    value: Value,
) -> Vec<u8> {
    let mut props = ApplicationProperties::default();
    props
        .0
        .insert(status_key.to_string(), SimpleValue::Int(status));
    props.0.insert(
        description_key.to_string(),
        SimpleValue::String(description.to_string()),
    );
    let message = Message::builder()
        .properties(reply_properties(request))
        .application_properties(props)
        .value(value)
        .build();
    serde_amqp::to_vec(&Serializable(message)).unwrap_or_default()
}

fn reply_with_condition(request: &Message<Body<Value>>, status: i32, description: &str) -> Vec<u8> {
    let condition = match status {
        401 => "com.microsoft:unauthorized-access",
        404 => "com.microsoft:message-not-found",
        410 => "com.microsoft:message-lock-lost",
        501 => "amqp:not-implemented",
        _ => "com.microsoft:argument-error",
    };
    let mut props = ApplicationProperties::default();
    props
        .0
        .insert("statusCode".to_string(), SimpleValue::Int(status));
    props.0.insert(
        "statusDescription".to_string(),
        SimpleValue::String(description.to_string()),
    );
    props.0.insert(
        "errorCondition".to_string(),
        SimpleValue::Symbol(Symbol::from(condition)),
    );
    let message = Message::builder()
        .properties(reply_properties(request))
        .application_properties(props)
        .value(Value::Null)
        .build();
    serde_amqp::to_vec(&Serializable(message)).unwrap_or_default()
}

fn map_get<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
    let Value::Map(map) = map else {
        return None;
    };
    map.iter().find_map(|(k, v)| match k {
        Value::String(s) if s == key => Some(v),
        Value::Symbol(s) if s.0 == key => Some(v),
        _ => None,
    })
}

fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Long(v) => Some(*v),
        Value::Int(v) => Some(i64::from(*v)),
        Value::Uint(v) => Some(i64::from(*v)),
        Value::Ulong(v) => i64::try_from(*v).ok(),
        Value::Short(v) => Some(i64::from(*v)),
        Value::Ushort(v) => Some(i64::from(*v)),
        Value::Byte(v) => Some(i64::from(*v)),
        Value::Ubyte(v) => Some(i64::from(*v)),
        _ => None,
    }
}

fn values(value: Option<&Value>) -> Vec<Value> {
    match value {
        Some(Value::Array(array)) => array.0.clone(),
        Some(Value::List(list)) => list.clone(),
        Some(other) => vec![other.clone()],
        None => Vec::new(),
    }
}

fn lock_tokens(body: &Value) -> Vec<[u8; 16]> {
    values(map_get(body, "lock-tokens"))
        .into_iter()
        .filter_map(|v| match v {
            Value::Uuid(uuid) => Some(uuid.into_inner()),
            _ => None,
        })
        .collect()
}

fn string_value(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

fn map_value(entries: Vec<(&str, Value)>) -> Value {
    let mut map = OrderedMap::new();
    for (key, value) in entries {
        map.insert(Value::String(key.to_string()), value);
    }
    Value::Map(map)
}

/// Runs one `$management` operation: (status code, description, response body).
fn management_operation(
    queue: &Queue,
    kind: SubQueueKind,
    operation: &str,
    body: &Value,
) -> (i32, String, Value) {
    match operation {
        "com.microsoft:renew-lock" => {
            let mut expirations = Vec::new();
            for token in lock_tokens(body) {
                match queue.renew(kind, &token) {
                    Ok(until) => expirations.push(Value::Timestamp(
                        fe2o3_amqp_types::primitives::Timestamp::from_milliseconds(until),
                    )),
                    Err(e) => return (410, e.to_string(), Value::Null),
                }
            }
            (
                200,
                "OK".into(),
                map_value(vec![(
                    "expirations",
                    Value::Array(fe2o3_amqp_types::primitives::Array(expirations)),
                )]),
            )
        }
        "com.microsoft:peek-message" => {
            let from = map_get(body, "from-sequence-number")
                .and_then(as_i64)
                .unwrap_or(1);
            let count = map_get(body, "message-count")
                .and_then(as_i64)
                .unwrap_or(1)
                .clamp(0, 1000) as usize;
            let peeked = queue.peek(kind, from, count);
            if peeked.is_empty() {
                return (204, "No messages".into(), Value::Null);
            }
            let messages = peeked
                .into_iter()
                .map(|(_, payload)| map_value(vec![("message", Value::Binary(payload.into()))]))
                .collect();
            (
                200,
                "OK".into(),
                map_value(vec![("messages", Value::List(messages))]),
            )
        }
        "com.microsoft:receive-by-sequence-number" => {
            let sequences: Vec<i64> = values(map_get(body, "sequence-numbers"))
                .iter()
                .filter_map(as_i64)
                .collect();
            let delivered = queue.receive_deferred(kind, &sequences);
            if delivered.is_empty() {
                return (
                    404,
                    "The requested message(s) could not be found.".into(),
                    Value::Null,
                );
            }
            let messages = delivered
                .into_iter()
                .map(|d| {
                    map_value(vec![
                        ("message", Value::Binary(d.payload.into())),
                        (
                            "lock-token",
                            Value::Uuid(fe2o3_amqp_types::primitives::Uuid::from(d.lock_token)),
                        ),
                    ])
                })
                .collect();
            (
                200,
                "OK".into(),
                map_value(vec![("messages", Value::List(messages))]),
            )
        }
        "com.microsoft:update-disposition" => {
            let status = string_value(map_get(body, "disposition-status")).unwrap_or_default();
            let reason = string_value(map_get(body, "deadletter-reason"));
            let description = string_value(map_get(body, "deadletter-description"));
            for token in lock_tokens(body) {
                let result = match status.as_str() {
                    "completed" => queue.complete(kind, &token),
                    "abandoned" => queue.abandon(kind, &token, true),
                    "defered" | "deferred" => queue.defer(kind, &token),
                    "suspended" => {
                        queue.dead_letter(kind, &token, reason.as_deref(), description.as_deref())
                    }
                    _ => {
                        return (
                            400,
                            format!("Unknown disposition status '{status}'."),
                            Value::Null,
                        )
                    }
                };
                if let Err(e) = result {
                    return (410, e.to_string(), Value::Null);
                }
            }
            (200, "OK".into(), map_value(Vec::new()))
        }
        "com.microsoft:schedule-message" => schedule(queue, body),
        "com.microsoft:cancel-scheduled-message" => {
            let sequences: Vec<i64> = values(map_get(body, "sequence-numbers"))
                .iter()
                .filter_map(as_i64)
                .collect();
            queue.cancel_scheduled(&sequences);
            (200, "OK".into(), map_value(Vec::new()))
        }
        other => (
            501,
            format!("The operation '{other}' is not supported."),
            Value::Null,
        ),
    }
}

/// `schedule-message`: each entry's `message` is a complete encoded message carrying its
/// scheduled enqueue time; answers with the assigned sequence numbers.
fn schedule(queue: &Queue, body: &Value) -> (i32, String, Value) {
    let mut parts = Vec::new();
    for entry in values(map_get(body, "messages")) {
        let Some(Value::Binary(encoded)) = map_get(&entry, "message") else {
            return (
                400,
                "A scheduled message entry has no message.".into(),
                Value::Null,
            );
        };
        match MessageParts::parse(&Bytes::from(encoded.to_vec())) {
            Ok(message) => parts.push(message),
            Err(e) => {
                return (
                    400,
                    format!("Malformed scheduled message: {e}"),
                    Value::Null,
                )
            }
        }
    }
    let sequences = queue.enqueue(parts).into_iter().map(Value::Long).collect();
    (
        200,
        "OK".into(),
        map_value(vec![(
            "sequence-numbers",
            Value::Array(fe2o3_amqp_types::primitives::Array(sequences)),
        )]),
    )
}

impl Handler for BrokerConnection {
    fn attach(&mut self, key: LinkKey, attach: &Attach) -> Result<AttachAccept, Error> {
        self.on_attach(key, attach)
    }

    fn detach(&mut self, key: LinkKey) {
        self.links.remove(&key);
    }

    fn transfer(
        &mut self,
        key: LinkKey,
        message: IncomingMessage,
    ) -> Result<Option<DeliveryState>, Error> {
        match self.links.get(&key) {
            Some(LinkRole::Sender { entity, queue }) => {
                let (entity, queue) = (entity.clone(), queue.clone());
                self.on_send(&entity, &queue, message)
            }
            Some(LinkRole::CbsRequests) => {
                self.on_cbs_request(message);
                Ok(Some(DeliveryState::Accepted(Accepted {})))
            }
            Some(LinkRole::ManagementRequests { entity, queue }) => {
                let (entity, queue) = (entity.clone(), queue.clone());
                self.on_management_request(&entity, &queue, message);
                Ok(Some(DeliveryState::Accepted(Accepted {})))
            }
            _ => Err(error(
                LinkError::DetachForced,
                "This link does not accept messages.",
            )),
        }
    }

    fn disposition(
        &mut self,
        key: LinkKey,
        tag: &[u8],
        state: Option<DeliveryState>,
        _settled: bool,
    ) -> Option<DeliveryState> {
        let Some(LinkRole::Receiver { entity, queue, .. }) = self.links.get(&key) else {
            return None;
        };
        let (entity, queue) = (entity.clone(), queue.clone());
        self.on_settle(&queue, &entity, tag, state)
    }

    fn outgoing(&mut self, key: LinkKey, credit: u32, out: &mut Vec<OutgoingMessage>) {
        let allowed = match self.links.get(&key) {
            Some(LinkRole::Receiver { entity, .. }) => self.require(entity, false).is_ok(),
            _ => true,
        };
        let wake = self.control.wake.clone();
        let mut tags = Vec::new();
        match self.links.get_mut(&key) {
            Some(LinkRole::CbsReplies(pending))
            | Some(LinkRole::ManagementReplies { pending, .. }) => {
                while out.len() < credit as usize {
                    let Some(payload) = pending.pop_front() else {
                        break;
                    };
                    out.push(OutgoingMessage {
                        tag: Vec::new(),
                        payload,
                        settled: true,
                    });
                    tags.push(out.len() - 1);
                }
            }
            Some(LinkRole::Receiver {
                queue,
                entity,
                mode,
            }) if allowed => {
                let mut delivered = Vec::new();
                queue.receive(kind(entity), *mode, credit, &wake, &mut delivered);
                let peek_lock = *mode == ReceiveMode::PeekLock;
                for d in delivered {
                    out.push(OutgoingMessage {
                        tag: if peek_lock {
                            tag_from_token(&d.lock_token)
                        } else {
                            Vec::new()
                        },
                        payload: d.payload,
                        settled: !peek_lock,
                    });
                    if !peek_lock {
                        tags.push(out.len() - 1);
                    }
                }
            }
            _ => {}
        }
        for index in tags {
            let tag = self.next_tag();
            if let Some(message) = out.get_mut(index) {
                message.tag = tag;
            }
        }
    }

    /// Service Bus drops an entity's links once the token that authorised them lapses (the
    /// client is expected to put a new one on `$cbs` before that). Asked after every frame
    /// batch, so it does nothing until a grant has expired, and then forgets that grant.
    fn detach_requested(&mut self) -> Vec<(LinkKey, Error)> {
        let now = SystemTime::now();
        if !self.grants.iter().any(|(_, grant)| grant.expires_at <= now) {
            return Vec::new();
        }
        // An expired grant gives no rights (see `rights`); dropping it changes nothing else.
        self.grants.retain(|(_, grant)| grant.expires_at > now);
        self.links
            .iter()
            .filter_map(|(key, role)| {
                let (entity, sends) = role.entity_link()?;
                self.require(entity, sends).err()?;
                let description = format!(
                    "The token authorising '{}' has expired; put a new token on $cbs before the current one expires.",
                    entity.path()
                );
                Some((*key, error(AmqpError::UnauthorizedAccess, description)))
            })
            .collect()
    }

    fn next_deadline(&self) -> Option<Instant> {
        if !self.links.values().any(|role| role.entity_link().is_some()) {
            return None;
        }
        let now = SystemTime::now();
        let next = self
            .grants
            .iter()
            .filter_map(|(_, grant)| grant.expires_at.duration_since(now).ok())
            .min()?;
        // Just past the expiry: `rights` compares with the wall clock.
        Some(Instant::now() + next + Duration::from_millis(1))
    }

    fn close_requested(&mut self) -> Option<Error> {
        self.control.kill.load(Ordering::Acquire).then(|| {
            error(
                fe2o3_amqp_types::definitions::ConnectionError::ConnectionForced,
                "The connection was closed by the server.",
            )
        })
    }

    fn closed(&mut self) {
        self.links.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_token_round_trips_through_tag_byte_order() {
        let token: [u8; 16] = *uuid::Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff")
            .expect("uuid")
            .as_bytes();
        let tag = tag_from_token(&token);
        // What a client reading the tag as a little-endian UUID sees.
        assert_eq!(
            uuid::Uuid::from_bytes_le(tag.clone().try_into().expect("16")),
            uuid::Uuid::from_bytes(token)
        );
        assert_eq!(token_from_tag(&tag), Some(token));
        assert_eq!(token_from_tag(&[1, 2, 3]), None);
    }

    #[test]
    fn management_peek_on_empty_queue_is_204() {
        let queue = Queue::new(crate::config::QueueSpec::with_defaults("q"));
        let body = map_value(vec![
            ("from-sequence-number", Value::Long(1)),
            ("message-count", Value::Int(5)),
        ]);
        let (status, _, _) = management_operation(
            &queue,
            SubQueueKind::Main,
            "com.microsoft:peek-message",
            &body,
        );
        assert_eq!(status, 204);
        let (status, _, _) =
            management_operation(&queue, SubQueueKind::Main, "com.microsoft:nope", &body);
        assert_eq!(status, 501);
    }
}
