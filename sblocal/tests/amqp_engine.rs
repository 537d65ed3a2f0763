//! The broker driven frame by frame over an in-memory stream (and TCP for the throughput run): what Service Bus clients rely on
//! (pipelined open, `$cbs`, 16-byte lock-token tags, settled echoes, splitting, drain) and how
//! bad input is answered without affecting other connections.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use fe2o3_amqp_types::definitions::{
    AmqpError, ErrorCondition, Fields, Handle, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::message::__private::{Deserializable, Serializable};
use fe2o3_amqp_types::messaging::{
    Accepted, ApplicationProperties, Body, DeliveryState, Message, MessageId, Modified, Properties,
    Rejected, Source, Target,
};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Close, Disposition, Flow, MaxFrameSize, Open, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp_types::sasl::SaslInit;
use sblocal::amqp::frame::{self, AmqpFrame, FRAME_TYPE_AMQP, FRAME_TYPE_SASL};
use sblocal::auth::{AuthError, Grant, Rights, TokenValidator};
use sblocal::broker::Broker;
use sblocal::config::QueueSpec;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const QUEUE: &str = "orders";

/// Tokens named by what they grant.
struct TestValidator;

impl TokenValidator for TestValidator {
    fn validate(&self, token: &str, entity_path: &str) -> Result<Grant, AuthError> {
        let rights = match token {
            "owner" => Rights {
                send: true,
                listen: true,
                manage: true,
            },
            "sender" => Rights {
                send: true,
                ..Rights::default()
            },
            "short-lived" => {
                return Ok(Grant {
                    rights: Rights {
                        send: true,
                        listen: true,
                        manage: false,
                    },
                    expires_at: SystemTime::now() + Duration::from_millis(300),
                    subject: "short-lived".into(),
                })
            }
            "expired" => return Err(AuthError::Expired),
            other => return Err(AuthError::Malformed(other.to_string())),
        };
        if !entity_path.eq_ignore_ascii_case(QUEUE) {
            return Err(AuthError::WrongResource(entity_path.to_string()));
        }
        Ok(Grant {
            rights,
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            subject: "test".into(),
        })
    }
}

fn broker() -> Arc<Broker> {
    let mut spec = QueueSpec::with_defaults(QUEUE);
    spec.max_delivery_count = 5;
    Broker::new(vec![spec], Arc::new(TestValidator))
}

/// Either end of an in-memory pipe or a TCP socket.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Client {
    stream: Box<dyn Stream>,
    input: BytesMut,
    output: BytesMut,
}

fn connect(broker: &Arc<Broker>) -> Client {
    let (client, server) = tokio::io::duplex(1 << 20);
    let broker = broker.clone();
    tokio::spawn(async move { broker.serve_connection(server).await });
    Client {
        stream: Box::new(client),
        input: BytesMut::new(),
        output: BytesMut::new(),
    }
}

/// A connection with an open session, authorized with `token`.
async fn connect_with_token(broker: &Arc<Broker>, max_frame_size: u32, token: &str) -> Client {
    let mut client = connect(broker);
    client.open_session_with_token(max_frame_size, token).await;
    client
}

impl Client {
    fn queue(&mut self, channel: u16, performative: Performative, payload: &[u8]) {
        frame::encode_frame(
            &mut self.output,
            FRAME_TYPE_AMQP,
            channel,
            &performative,
            payload,
        )
        .expect("encode");
    }

    async fn flush(&mut self) {
        let bytes = self.output.split();
        self.stream.write_all(&bytes).await.expect("write");
    }

    async fn send(&mut self, channel: u16, performative: Performative, payload: &[u8]) {
        self.queue(channel, performative, payload);
        self.flush().await;
    }

    async fn fill(&mut self) -> bool {
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            self.stream.read_buf(&mut self.input),
        )
        .await
        .expect("broker answers within 5s")
        .expect("read");
        read > 0
    }

    async fn header(&mut self) -> [u8; 8] {
        while self.input.len() < 8 {
            assert!(self.fill().await, "closed before header");
        }
        let header = self.input.split_to(8);
        header[..].try_into().expect("8 bytes")
    }

    async fn raw_frame(&mut self) -> Option<frame::RawFrame> {
        loop {
            if let Some(raw) = frame::take_frame(&mut self.input, 1 << 24).expect("valid frame") {
                return Some(raw);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next non-empty AMQP frame, or `None` when the broker closed the stream.
    async fn frame(&mut self) -> Option<AmqpFrame> {
        loop {
            let raw = self.raw_frame().await?;
            let decoded = frame::decode_amqp(raw).expect("decodes");
            if decoded.performative.is_some() {
                return Some(decoded);
            }
        }
    }

    async fn performative(&mut self) -> Performative {
        self.frame()
            .await
            .and_then(|f| f.performative)
            .expect("a performative")
    }

    async fn sasl_anonymous(&mut self) {
        self.stream
            .write_all(b"AMQP\x03\x01\x00\x00")
            .await
            .expect("write");
        assert_eq!(&self.header().await, b"AMQP\x03\x01\x00\x00");
        let mechanisms = self.raw_frame().await.expect("mechanisms");
        assert_eq!(mechanisms.frame_type, FRAME_TYPE_SASL);
        let init = SaslInit {
            mechanism: Symbol::from("ANONYMOUS"),
            initial_response: None,
            hostname: None,
        };
        frame::encode_frame(&mut self.output, FRAME_TYPE_SASL, 0, &init, &[]).expect("encode");
        self.flush().await;
        let outcome = self.raw_frame().await.expect("outcome");
        assert_eq!(outcome.frame_type, FRAME_TYPE_SASL);
    }

    /// SASL, then header, open and begin pipelined before reading anything back, as the SDKs do.
    async fn open(&mut self, max_frame_size: u32) {
        self.sasl_anonymous().await;
        self.output.extend_from_slice(b"AMQP\x00\x01\x00\x00");
        self.queue(0, open(max_frame_size), &[]);
        self.queue(0, begin(), &[]);
        self.flush().await;
        assert_eq!(&self.header().await, b"AMQP\x00\x01\x00\x00");
        assert!(matches!(self.performative().await, Performative::Open(_)));
        assert!(matches!(self.performative().await, Performative::Begin(_)));
    }

    /// Opens the connection and session, then authorizes it with `token`, which must be accepted.
    async fn open_session_with_token(&mut self, max_frame_size: u32, token: &str) {
        self.open(max_frame_size).await;
        assert_eq!(self.put_token(token).await, 202);
    }

    /// `$cbs` put-token for the queue; returns the reply's status code.
    async fn put_token(&mut self, token: &str) -> i32 {
        self.send(
            0,
            attach(
                "cbs-out",
                10,
                Role::Sender,
                "$cbs",
                SenderSettleMode::Unsettled,
            ),
            &[],
        )
        .await;
        assert!(matches!(self.performative().await, Performative::Attach(_)));
        assert!(matches!(self.performative().await, Performative::Flow(_)));
        self.send(
            0,
            attach(
                "cbs-in",
                11,
                Role::Receiver,
                "$cbs",
                SenderSettleMode::Unsettled,
            ),
            &[],
        )
        .await;
        assert!(matches!(self.performative().await, Performative::Attach(_)));
        self.send(0, flow(11, 0, 10, false), &[]).await;
        let mut props = ApplicationProperties::default();
        props
            .0
            .insert("operation".into(), SimpleValue::String("put-token".into()));
        props
            .0
            .insert("type".into(), SimpleValue::String("jwt".into()));
        props.0.insert(
            "name".into(),
            SimpleValue::String(format!("sb://localhost/{QUEUE}")),
        );
        let request = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String("req-1".into())),
                ..Properties::default()
            })
            .application_properties(props)
            .value(token.to_string())
            .build();
        let payload = serde_amqp::to_vec(&Serializable(request)).expect("encode");
        self.send(0, transfer(10, 0, b"t0", false, false), &payload)
            .await;
        let mut status = None;
        let mut request_settled = false;
        while status.is_none() || !request_settled {
            let frame = self.frame().await.expect("reply");
            if let Some(Performative::Disposition(d)) = &frame.performative {
                assert!(d.settled);
                request_settled = true;
            }
            if let Some(Performative::Transfer(_)) = frame.performative {
                let Deserializable(reply): Deserializable<Message<Body<Value>>> =
                    serde_amqp::from_slice(&frame.payload).expect("reply message");
                let correlation = reply.properties.and_then(|p| p.correlation_id);
                assert_eq!(correlation, Some(MessageId::String("req-1".into())));
                match reply
                    .application_properties
                    .and_then(|p| p.0.get("status-code").cloned())
                {
                    Some(SimpleValue::Int(code)) => status = Some(code),
                    other => panic!("status-code missing: {other:?}"),
                }
            }
        }
        status.unwrap_or_default()
    }
}

fn open(max_frame_size: u32) -> Performative {
    Performative::Open(Open {
        container_id: "test".into(),
        hostname: Some("localhost".into()),
        max_frame_size: MaxFrameSize(max_frame_size),
        channel_max: ChannelMax(10),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    })
}

fn begin() -> Performative {
    Performative::Begin(Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 5000,
        outgoing_window: 5000,
        handle_max: Handle(100),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    })
}

fn attach(
    name: &str,
    handle: u32,
    role: Role,
    address: &str,
    snd: SenderSettleMode,
) -> Performative {
    let source = Source::builder().address(address.to_string()).build();
    let target = Target::builder().address(address.to_string()).build();
    Performative::Attach(Attach {
        name: name.into(),
        handle: Handle(handle),
        role: role.clone(),
        snd_settle_mode: snd,
        rcv_settle_mode: ReceiverSettleMode::Second,
        source: Some(Box::new(source)),
        target: Some(Box::new(target.into())),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: (role == Role::Sender).then_some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    })
}

fn flow(handle: u32, delivery_count: u32, credit: u32, drain: bool) -> Performative {
    // A window that never closes: these tests do not track incoming transfer ids.
    Performative::Flow(Flow {
        next_incoming_id: Some(0),
        incoming_window: u32::MAX,
        next_outgoing_id: 0,
        outgoing_window: 5000,
        handle: Some(Handle(handle)),
        delivery_count: Some(delivery_count),
        link_credit: Some(credit),
        available: None,
        drain,
        echo: false,
        properties: None,
    })
}

fn transfer(handle: u32, delivery_id: u32, tag: &[u8], settled: bool, more: bool) -> Performative {
    Performative::Transfer(Transfer {
        handle: Handle(handle),
        delivery_id: Some(delivery_id),
        delivery_tag: Some(ByteBuf::from(tag.to_vec())),
        message_format: Some(0),
        settled: Some(settled),
        more,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    })
}

fn disposition(delivery_id: u32, state: DeliveryState) -> Performative {
    Performative::Disposition(Disposition {
        role: Role::Receiver,
        first: delivery_id,
        last: None,
        settled: false,
        state: Some(state),
        batchable: false,
    })
}

fn data_message(body: &[u8]) -> Vec<u8> {
    let message = Message::builder().data(Binary::from(body.to_vec())).build();
    serde_amqp::to_vec(&Serializable(message)).expect("encode")
}

fn active(broker: &Broker) -> u64 {
    broker
        .queue_stats(QUEUE)
        .map(|s| s.active_messages)
        .unwrap_or(u64::MAX)
}

/// Sends the attach of an unsettled sender link on `address` without reading the reply.
async fn send_sender_attach(client: &mut Client, handle: u32, address: &str) {
    client
        .send(
            0,
            attach(
                "sender",
                handle,
                Role::Sender,
                address,
                SenderSettleMode::Unsettled,
            ),
            &[],
        )
        .await;
}

/// Attaches an unsettled sender on `address`; returns the broker's attach after its credit flow.
async fn attach_unsettled_sender(client: &mut Client, handle: u32, address: &str) -> Attach {
    send_sender_attach(client, handle, address).await;
    let Performative::Attach(reply) = client.performative().await else {
        panic!("expected attach");
    };
    assert!(matches!(client.performative().await, Performative::Flow(_)));
    reply
}

/// Attaches a sender on `address`, sends `bodies`, and waits for each accepted disposition.
async fn send_messages(
    client: &mut Client,
    handle: u32,
    address: &str,
    bodies: &[&[u8]],
) -> Attach {
    let reply = attach_unsettled_sender(client, handle, address).await;
    for (i, body) in bodies.iter().enumerate() {
        let tag = [i as u8];
        client
            .send(
                0,
                transfer(handle, 100 + i as u32, &tag, false, false),
                &data_message(body),
            )
            .await;
        match client.performative().await {
            Performative::Disposition(d) => {
                assert!(d.settled);
                assert!(matches!(d.state, Some(DeliveryState::Accepted(_))));
            }
            other => panic!("expected disposition, got {other:?}"),
        }
    }
    reply
}

async fn attach_receiver(client: &mut Client, handle: u32, snd: SenderSettleMode) -> Attach {
    client
        .send(
            0,
            attach("receiver", handle, Role::Receiver, QUEUE, snd),
            &[],
        )
        .await;
    let Performative::Attach(reply) = client.performative().await else {
        panic!("expected attach");
    };
    reply
}

#[tokio::test]
async fn peek_lock_round_trip_with_lock_token_tags_and_settled_echo() {
    let broker = broker();
    let mut client = connect_with_token(&broker, 64 * 1024, "owner").await;

    let sender = send_messages(
        &mut client,
        1,
        &format!("amqps://localhost:5671/{QUEUE}"),
        &[b"one", b"two"],
    )
    .await;
    assert!(sender.max_message_size.is_some());
    let batch_size = sender.properties.as_ref().and_then(|p: &Fields| {
        p.get(&Symbol::from("com.microsoft:max-message-batch-size"))
            .cloned()
    });
    assert!(batch_size.is_some());
    assert_eq!(active(&broker), 2);

    let receiver = attach_receiver(&mut client, 2, SenderSettleMode::Unsettled).await;
    assert_eq!(receiver.initial_delivery_count, Some(0));
    client.send(0, flow(2, 0, 2, false), &[]).await;
    let mut deliveries = Vec::new();
    while deliveries.len() < 2 {
        let frame = client.frame().await.expect("transfer");
        let Some(Performative::Transfer(t)) = frame.performative else {
            continue;
        };
        let tag = t.delivery_tag.expect("tag");
        assert_eq!(tag.len(), 16, "lock token tags are 16 bytes");
        assert_eq!(t.settled, Some(false));
        let Deserializable(message): Deserializable<Message<Body<Value>>> =
            serde_amqp::from_slice(&frame.payload).expect("message");
        let annotations = message.message_annotations.expect("annotations");
        for key in [
            "x-opt-sequence-number",
            "x-opt-enqueued-time",
            "x-opt-locked-until",
            "x-opt-lock-token",
        ] {
            assert!(
                annotations.0.keys().any(|k| format!("{k:?}").contains(key)),
                "{key} missing"
            );
        }
        deliveries.push(t.delivery_id.expect("id"));
    }
    // Complete the first, dead-letter the second: each answered by a settled echo.
    client
        .send(
            0,
            disposition(deliveries[0], DeliveryState::Accepted(Accepted {})),
            &[],
        )
        .await;
    let Performative::Disposition(echo) = client.performative().await else {
        panic!("expected echo");
    };
    assert!(echo.settled);
    assert_eq!(echo.role, Role::Sender);
    assert!(matches!(echo.state, Some(DeliveryState::Accepted(_))));

    let mut info = Fields::default();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String("bad".into()),
    );
    let error = fe2o3_amqp_types::definitions::Error::new(
        fe2o3_amqp_types::definitions::ErrorCondition::Custom(Symbol::from(
            "com.microsoft:dead-letter",
        )),
        None,
        Some(info),
    );
    client
        .send(
            0,
            disposition(
                deliveries[1],
                DeliveryState::Rejected(Rejected { error: Some(error) }),
            ),
            &[],
        )
        .await;
    let Performative::Disposition(echo) = client.performative().await else {
        panic!("expected echo");
    };
    assert!(echo.settled);
    match echo.state {
        Some(DeliveryState::Rejected(rejected)) => assert!(rejected.error.is_none()),
        other => panic!("expected rejected echo, got {other:?}"),
    }
    assert_eq!(active(&broker), 0);
    assert_eq!(
        broker.queue_stats(QUEUE).map(|s| s.dead_letter_messages),
        Some(1)
    );
}

#[tokio::test]
async fn abandon_echoes_modified_and_redelivers_with_higher_count() {
    let broker = broker();
    let mut client = connect_with_token(&broker, 64 * 1024, "owner").await;
    send_messages(&mut client, 1, QUEUE, &[b"again"]).await;
    attach_receiver(&mut client, 2, SenderSettleMode::Unsettled).await;
    client.send(0, flow(2, 0, 1, false), &[]).await;
    let Performative::Transfer(first) = client.performative().await else {
        panic!("expected transfer");
    };
    let modified = Modified {
        delivery_failed: Some(true),
        undeliverable_here: None,
        message_annotations: None,
    };
    client
        .send(
            0,
            disposition(
                first.delivery_id.unwrap_or_default(),
                DeliveryState::Modified(modified),
            ),
            &[],
        )
        .await;
    let Performative::Disposition(echo) = client.performative().await else {
        panic!("expected echo");
    };
    assert!(matches!(echo.state, Some(DeliveryState::Modified(_))));
    client.send(0, flow(2, 1, 1, false), &[]).await;
    let frame = client.frame().await.expect("redelivery");
    let Deserializable(message): Deserializable<Message<Body<Value>>> =
        serde_amqp::from_slice(&frame.payload).expect("message");
    assert_eq!(message.header.map(|h| h.delivery_count), Some(1));
}

#[tokio::test]
async fn outgoing_messages_are_split_at_the_clients_max_frame_size() {
    let broker = broker();
    let mut client = connect_with_token(&broker, 512, "owner").await;
    let body = vec![7u8; 3000];
    // The client honours our larger max-frame-size, so one frame carries the send.
    send_messages(&mut client, 1, QUEUE, &[&body]).await;
    attach_receiver(&mut client, 2, SenderSettleMode::Settled).await;
    client.send(0, flow(2, 0, 1, false), &[]).await;
    let mut payload = Vec::new();
    let mut frames = 0;
    loop {
        let frame = client.frame().await.expect("transfer");
        let Some(Performative::Transfer(t)) = frame.performative else {
            continue;
        };
        frames += 1;
        payload.extend_from_slice(&frame.payload);
        if !t.more {
            assert_eq!(
                t.settled,
                Some(true),
                "receive-and-delete deliveries are settled"
            );
            break;
        }
    }
    assert!(frames > 1, "a 3000-byte message must span 512-byte frames");
    let Deserializable(message): Deserializable<Message<Body<Value>>> =
        serde_amqp::from_slice(&payload).expect("message");
    match message.body {
        Body::Data(batch) => assert_eq!(batch.first().map(|d| d.0.len()), Some(3000)),
        other => panic!("unexpected body {other:?}"),
    }
    assert_eq!(active(&broker), 0);
}

#[tokio::test]
async fn multi_frame_sends_are_reassembled() {
    let broker = broker();
    let mut client = connect_with_token(&broker, 64 * 1024, "owner").await;
    attach_unsettled_sender(&mut client, 1, QUEUE).await;
    let message = data_message(&[1u8; 2000]);
    let (head, tail) = message.split_at(700);
    client
        .send(0, transfer(1, 0, b"x", false, true), head)
        .await;
    client
        .send(0, transfer(1, 0, b"x", false, false), tail)
        .await;
    let Performative::Disposition(d) = client.performative().await else {
        panic!("expected disposition");
    };
    assert!(matches!(d.state, Some(DeliveryState::Accepted(_))));
    assert_eq!(active(&broker), 1);
}

#[tokio::test]
async fn drain_on_an_empty_queue_returns_the_credit() {
    let broker = broker();
    let mut client = connect_with_token(&broker, 64 * 1024, "owner").await;
    attach_receiver(&mut client, 2, SenderSettleMode::Unsettled).await;
    client.send(0, flow(2, 0, 5, true), &[]).await;
    let Performative::Flow(reply) = client.performative().await else {
        panic!("expected flow");
    };
    assert!(reply.drain);
    assert_eq!(reply.link_credit, Some(0));
    assert_eq!(reply.delivery_count, Some(5));
}

#[tokio::test]
async fn links_without_a_token_or_with_too_few_rights_are_refused() {
    let broker = broker();
    let mut client = connect(&broker);
    client.open(64 * 1024).await;
    send_sender_attach(&mut client, 1, QUEUE).await;
    let Performative::Attach(reply) = client.performative().await else {
        panic!("expected attach");
    };
    assert!(reply.target.is_none());
    let Performative::Detach(detach) = client.performative().await else {
        panic!("expected detach");
    };
    let condition = detach.error.map(|e| e.condition);
    assert_eq!(
        condition,
        Some(fe2o3_amqp_types::definitions::AmqpError::UnauthorizedAccess.into())
    );

    let mut client = connect_with_token(&broker, 64 * 1024, "sender").await;
    attach_receiver(&mut client, 2, SenderSettleMode::Unsettled).await;
    assert!(matches!(
        client.performative().await,
        Performative::Detach(_)
    ));

    for refused in ["expired", "garbage"] {
        let mut client = connect(&broker);
        client.open(64 * 1024).await;
        assert_eq!(client.put_token(refused).await, 401);
    }
}

#[tokio::test]
async fn unknown_entity_is_not_found() {
    let broker = broker();
    let mut client = connect(&broker);
    client.open(64 * 1024).await;
    send_sender_attach(&mut client, 1, "nope").await;
    client.performative().await;
    let Performative::Detach(detach) = client.performative().await else {
        panic!("expected detach");
    };
    assert_eq!(
        detach.error.map(|e| e.condition),
        Some(fe2o3_amqp_types::definitions::AmqpError::NotFound.into())
    );
}

async fn expect_close_with_error(client: &mut Client) {
    loop {
        match client.frame().await {
            Some(AmqpFrame {
                performative: Some(Performative::Close(Close { error })),
                ..
            }) => {
                assert!(error.is_some(), "close carries the reason");
                return;
            }
            Some(_) => continue,
            None => panic!("stream closed without a close frame"),
        }
    }
}

#[tokio::test]
async fn garbage_frames_close_only_that_connection() {
    let broker = broker();
    let mut healthy = connect_with_token(&broker, 64 * 1024, "owner").await;

    // An unknown performative descriptor.
    let mut bad = connect(&broker);
    bad.open(64 * 1024).await;
    let mut raw = BytesMut::new();
    raw.extend_from_slice(&[0, 0, 0, 12, 2, 0, 0, 0, 0x00, 0x53, 0x1f, 0x45]);
    bad.stream.write_all(&raw).await.expect("write");
    expect_close_with_error(&mut bad).await;

    // A performative nesting lists thousands deep (a decoder that recursed would overflow).
    let mut bad = connect(&broker);
    bad.open(64 * 1024).await;
    let mut nested = vec![0x45u8];
    for _ in 0..5000 {
        let mut outer = vec![0xd0];
        outer.extend_from_slice(&((nested.len() + 4) as u32).to_be_bytes());
        outer.extend_from_slice(&1u32.to_be_bytes());
        outer.extend_from_slice(&nested);
        nested = outer;
    }
    let mut body = vec![0x00, 0x53, 0x13];
    body.extend_from_slice(&nested);
    let mut raw = BytesMut::new();
    raw.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    raw.extend_from_slice(&[2, 0, 0, 0]);
    raw.extend_from_slice(&body);
    bad.stream.write_all(&raw).await.expect("write");
    expect_close_with_error(&mut bad).await;

    // A frame size beyond what we announced.
    let mut bad = connect(&broker);
    bad.open(64 * 1024).await;
    bad.stream
        .write_all(&[0x7f, 0, 0, 0, 2, 0, 0, 0])
        .await
        .expect("write");
    expect_close_with_error(&mut bad).await;

    // A transfer before any attach.
    let mut bad = connect(&broker);
    bad.open(64 * 1024).await;
    bad.send(0, transfer(9, 0, b"t", false, false), b"zz").await;
    expect_close_with_error(&mut bad).await;

    // Not AMQP at all: the broker answers with its protocol header and hangs up.
    let mut bad = connect(&broker);
    bad.stream
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(&bad.header().await[..4], b"AMQP");

    // A client vanishing mid-transfer.
    let mut gone = connect_with_token(&broker, 64 * 1024, "owner").await;
    gone.send(
        0,
        attach("s", 1, Role::Sender, QUEUE, SenderSettleMode::Unsettled),
        &[],
    )
    .await;
    gone.performative().await;
    gone.send(0, transfer(1, 0, b"t", false, true), &[0x00, 0x53, 0x75])
        .await;
    drop(gone);

    send_messages(&mut healthy, 1, QUEUE, &[b"still fine"]).await;
    assert_eq!(active(&broker), 1);
}

#[tokio::test]
async fn dropped_connections_get_a_close_with_an_error() {
    let broker = broker();
    let mut client = connect(&broker);
    client.open(64 * 1024).await;
    broker.drop_all_connections();
    expect_close_with_error(&mut client).await;
}

#[tokio::test]
async fn server_busy_rejects_sends() {
    let broker = broker();
    let mut client = connect_with_token(&broker, 64 * 1024, "owner").await;
    broker.server_busy_for(Duration::from_secs(60));
    attach_unsettled_sender(&mut client, 1, QUEUE).await;
    client
        .send(
            0,
            transfer(1, 0, b"x", false, false),
            &data_message(b"busy"),
        )
        .await;
    let Performative::Disposition(d) = client.performative().await else {
        panic!("expected disposition");
    };
    match d.state {
        Some(DeliveryState::Rejected(Rejected { error: Some(error) })) => {
            assert_eq!(
                error.condition,
                fe2o3_amqp_types::definitions::ErrorCondition::Custom(Symbol::from(
                    "com.microsoft:server-busy"
                ))
            );
        }
        other => panic!("expected server-busy, got {other:?}"),
    }
    assert_eq!(active(&broker), 0);
}

/// Sends `count` 1 KB messages, `per_transfer` to a transfer (more than one: a Service Bus
/// batch), keeping up to 2000 transfers unsettled; returns messages per second.
async fn measure_sends(client: &mut Client, handle: u32, count: u32, per_transfer: u32) -> f64 {
    let single = data_message(&[b'x'; 1024]);
    let payload = if per_transfer == 1 {
        single
    } else {
        let inner: Vec<Binary> = (0..per_transfer)
            .map(|_| Binary::from(single.clone()))
            .collect();
        let batch = Message::builder().data_batch(inner).build();
        serde_amqp::to_vec(&Serializable(batch)).expect("encode")
    };
    let transfers = count / per_transfer;
    let started = std::time::Instant::now();
    let (mut sent, mut settled) = (0u32, 0u32);
    while settled < transfers {
        while sent < transfers && sent - settled < 2000 {
            let Performative::Transfer(mut t) =
                transfer(handle, sent, &sent.to_be_bytes(), false, false)
            else {
                unreachable!("transfer() builds a transfer");
            };
            if per_transfer > 1 {
                t.message_format = Some(0x8001_3700);
            }
            client.queue(0, Performative::Transfer(t), &payload);
            sent += 1;
        }
        client.flush().await;
        if let Some(Performative::Disposition(d)) =
            client.frame().await.and_then(|f| f.performative)
        {
            settled += d.last.unwrap_or(d.first) - d.first + 1;
        }
    }
    f64::from(transfers * per_transfer) / started.elapsed().as_secs_f64()
}

/// Receives `count` messages with 1000 credit, settling every 500 in one ranged disposition
/// (peek-lock) or not at all (receive-and-delete); returns messages per second.
async fn measure_receives(client: &mut Client, handle: u32, count: u32, peek_lock: bool) -> f64 {
    let started = std::time::Instant::now();
    let mut received = 0u32;
    client.send(0, flow(handle, 0, 1000, false), &[]).await;
    while received < count {
        let frame = client.frame().await.expect("transfer");
        let Some(Performative::Transfer(t)) = frame.performative else {
            continue;
        };
        if t.more {
            continue;
        }
        received += 1;
        if received.is_multiple_of(500) {
            if peek_lock {
                let last = t.delivery_id.unwrap_or_default();
                client.queue(
                    0,
                    Performative::Disposition(Disposition {
                        role: Role::Receiver,
                        first: last - 499,
                        last: Some(last),
                        settled: true,
                        state: Some(DeliveryState::Accepted(Accepted {})),
                        batchable: false,
                    }),
                    &[],
                );
            }
            // Stop at `count`: this client does not read while it sends, so no more may come.
            let credit = (count - received).min(1000);
            client.queue(0, flow(handle, received, credit, false), &[]);
            client.flush().await;
        }
    }
    f64::from(count) / started.elapsed().as_secs_f64()
}

/// The broker's own ceiling over real TCP with a raw client: 1 KB messages in (single and
/// batched) and out (peek-lock and receive-and-delete). Run with
/// `cargo test --release -p sblocal --test amqp_engine throughput_ceiling -- --ignored --nocapture`;
/// nothing is asserted about time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_ceiling() {
    const COUNT: u32 = 50_000;
    let broker = broker();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let serving = broker.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let broker = serving.clone();
            tokio::spawn(async move { broker.serve_connection(stream).await });
        }
    });
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut client = Client {
        stream: Box::new(stream),
        input: BytesMut::new(),
        output: BytesMut::new(),
    };
    client.open_session_with_token(256 * 1024, "owner").await;
    attach_unsettled_sender(&mut client, 1, QUEUE).await;

    let single_in = measure_sends(&mut client, 1, COUNT, 1).await;
    attach_receiver(&mut client, 2, SenderSettleMode::Unsettled).await;
    let peek_lock_out = measure_receives(&mut client, 2, COUNT, true).await;
    let batched_in = measure_sends(&mut client, 1, COUNT, 100).await;
    client
        .send(
            0,
            attach("rad", 3, Role::Receiver, QUEUE, SenderSettleMode::Settled),
            &[],
        )
        .await;
    client.performative().await;
    let delete_out = measure_receives(&mut client, 3, COUNT, false).await;
    println!("1 KB messages over TCP, one connection:");
    println!("  in, one message per transfer:      {single_in:>9.0} msg/s");
    println!("  in, batches of 100:                {batched_in:>9.0} msg/s");
    println!("  out, peek-lock (ranged settlement): {peek_lock_out:>9.0} msg/s");
    println!("  out, receive-and-delete:           {delete_out:>9.0} msg/s");
    // The last settlement may still be in flight.
    for _ in 0..500 {
        if active(&broker) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(active(&broker), 0);
}

#[tokio::test]
async fn heartbeats_follow_the_clients_idle_timeout() {
    let broker = broker();
    let mut client = connect(&broker);
    client.sasl_anonymous().await;
    client.output.extend_from_slice(b"AMQP\x00\x01\x00\x00");
    let Performative::Open(mut open) = open(64 * 1024) else {
        panic!("open");
    };
    open.idle_time_out = Some(100);
    client.queue(0, Performative::Open(open), &[]);
    client.flush().await;
    assert_eq!(&client.header().await, b"AMQP\x00\x01\x00\x00");
    assert!(matches!(client.performative().await, Performative::Open(_)));
    // Nothing else is going on, so what arrives now are empty (heartbeat) frames.
    for _ in 0..2 {
        let raw = client.raw_frame().await.expect("heartbeat");
        assert!(raw.body.is_empty());
    }
}

/// As Service Bus does: once the token that authorised a link lapses, the link is detached
/// with `amqp:unauthorized-access`, unprompted, and nothing is delivered on that token.
#[tokio::test]
async fn links_are_detached_when_their_token_expires() {
    let broker = broker();
    let mut receiving = connect(&broker);
    receiving
        .open_session_with_token(64 * 1024, "short-lived")
        .await;
    attach_receiver(&mut receiving, 2, SenderSettleMode::Unsettled).await;
    let attached = std::time::Instant::now();

    let next = tokio::time::timeout(Duration::from_secs(5), receiving.performative())
        .await
        .expect("the link is detached once its token expires");
    let Performative::Detach(detach) = next else {
        panic!("only the detach was expected, got {next:?}");
    };
    let error = detach.error.expect("the detach carries the reason");
    assert_eq!(
        error.condition,
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
    );
    assert!(detach.closed);
    assert!(
        attached.elapsed() < Duration::from_secs(2),
        "detached at the expiry (300 ms), not at some later sweep: {:?}",
        attached.elapsed()
    );

    // Credit on the detached handle brings nothing either.
    let mut sending = connect_with_token(&broker, 64 * 1024, "owner").await;
    send_messages(&mut sending, 1, QUEUE, &[b"for nobody"]).await;
    receiving.send(0, flow(2, 0, 1, false), &[]).await;
    let next = tokio::time::timeout(Duration::from_millis(300), receiving.frame()).await;
    assert!(
        !matches!(
            next,
            Ok(Some(AmqpFrame {
                performative: Some(Performative::Transfer(_)),
                ..
            }))
        ),
        "a delivery went out on an expired token: {next:?}"
    );
    assert_eq!(active(&broker), 1);
}

#[tokio::test]
async fn a_client_that_writes_before_it_reads_does_not_wedge_the_connection() {
    let broker = broker();
    let (stream, server) = tokio::io::duplex(64 * 1024);
    let serving = broker.clone();
    tokio::spawn(async move { serving.serve_connection(server).await });
    let mut client = Client {
        stream: Box::new(stream),
        input: BytesMut::new(),
        output: BytesMut::new(),
    };
    client.open_session_with_token(64 * 1024, "owner").await;
    attach_receiver(&mut client, 2, SenderSettleMode::Settled).await;
    client.send(0, flow(2, 0, 2000, false), &[]).await;
    client
        .send(
            0,
            attach("sender", 1, Role::Sender, QUEUE, SenderSettleMode::Settled),
            &[],
        )
        .await;
    // 2 MB of sends in one write, far beyond the pipe, while every message is delivered
    // straight back to this same client, which reads nothing until it has written it all.
    let message = data_message(&[b'z'; 1024]);
    for i in 0..2000u32 {
        client.queue(0, transfer(1, i, &i.to_be_bytes(), true, false), &message);
    }
    let written = tokio::time::timeout(Duration::from_secs(10), client.flush()).await;
    assert!(
        written.is_ok(),
        "the broker stopped reading while its writes were blocked"
    );
    let mut delivered = 0;
    while delivered < 2000 {
        if let Some(Performative::Transfer(t)) = client.frame().await.and_then(|f| f.performative) {
            if !t.more {
                delivered += 1;
            }
        }
    }
    assert_eq!(active(&broker), 0);
}
