//! Randomised input against the frame decoder, the value measurer and whole connections:
//! nothing may panic, and the broker keeps serving other clients. A fixed-seed generator keeps
//! failures reproducible; `SBLOCAL_FUZZ_ITERATIONS` raises the effort.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{
    Accepted, ApplicationProperties, DeliveryState, Message, Modified, Rejected, Released, Source,
    Target,
};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Detach, Disposition, End, Flow, MaxFrameSize, Open, Performative,
    Transfer,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue};
use sblocal::amqp::codec;
use sblocal::amqp::frame::{self, FRAME_TYPE_AMQP};
use sblocal::auth::{AuthError, Grant, Rights, TokenValidator};
use sblocal::broker::message::MessageParts;
use sblocal::broker::Broker;
use sblocal::config::QueueSpec;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct AllowAll;

impl TokenValidator for AllowAll {
    fn validate(&self, _token: &str, _entity_path: &str) -> Result<Grant, AuthError> {
        Ok(Grant {
            rights: Rights {
                send: true,
                listen: true,
                manage: true,
            },
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            subject: "fuzz".into(),
        })
    }
}

/// xorshift64*: small, fast and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn iterations(default: usize) -> usize {
    std::env::var("SBLOCAL_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A plausible client conversation: header, open, begin, attach, flow, transfers.
fn valid_conversation() -> Vec<u8> {
    let mut out = BytesMut::new();
    out.extend_from_slice(b"AMQP\x00\x01\x00\x00");
    let frames = vec![
        Performative::Open(Open {
            container_id: "fuzz".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(4096),
            channel_max: ChannelMax(4),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: Handle(10),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        Performative::Attach(Attach {
            name: "r".into(),
            handle: Handle(0),
            role: Role::Receiver,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::Second,
            source: Some(Box::new(Source::builder().address("q").build())),
            target: Some(Box::new(Target::builder().address("client").build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(Handle(0)),
            delivery_count: Some(0),
            link_credit: Some(10),
            available: None,
            drain: true,
            echo: true,
            properties: None,
        }),
    ];
    for performative in frames {
        frame::encode_frame(&mut out, FRAME_TYPE_AMQP, 0, &performative, &[]).expect("encode");
    }
    let message = Message::builder().data(Binary::from(vec![1u8; 64])).build();
    let payload = serde_amqp::to_vec(&Serializable(message)).expect("encode");
    let transfer = Performative::Transfer(Transfer {
        handle: Handle(0),
        delivery_id: Some(0),
        delivery_tag: Some(ByteBuf::from(vec![1])),
        message_format: Some(0),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    });
    frame::encode_frame(&mut out, FRAME_TYPE_AMQP, 0, &transfer, &payload).expect("encode");
    out.to_vec()
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..=rng.below(8) {
                let at = rng.below(data.len());
                data[at] = rng.next() as u8;
            }
        }
        1 => data.truncate(rng.below(data.len())),
        2 => {
            let at = rng.below(data.len());
            let len = rng.below(64);
            let junk = rng.bytes(len);
            data.splice(at..at, junk);
        }
        _ => {
            let at = rng.below(data.len());
            let len = rng.below(data.len() - at);
            data.drain(at..at + len);
        }
    }
    data
}

#[test]
fn decoders_never_panic_on_random_input() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let seed = valid_conversation();
    for _ in 0..iterations(20_000) {
        let input = if rng.below(2) == 0 {
            mutate(&mut rng, &seed[8..])
        } else {
            let len = rng.below(200);
            rng.bytes(len)
        };
        let mut buf = BytesMut::from(&input[..]);
        while let Ok(Some(raw)) = frame::take_frame(&mut buf, 1 << 20) {
            let _ = frame::decode_amqp(raw);
        }
        let _ = codec::value_len(&input);
        let bytes = Bytes::from(input);
        let _ = codec::split_sections(&bytes);
        let _ = MessageParts::parse(&bytes);
    }
}

/// Writes `input` to a fresh connection (`buffer` bytes of pipe), reads whatever comes back
/// for `read_for`, then hangs up: the connection task must end on its own, without a panic.
async fn feed_and_hang_up(broker: &Arc<Broker>, input: &[u8], buffer: usize, read_for: Duration) {
    let (mut client, server) = tokio::io::duplex(buffer);
    let serving = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.serve_connection(server).await })
    };
    let _ = client.write_all(input).await;
    let mut sink = vec![0u8; 1 << 16];
    let _ = tokio::time::timeout(read_for, client.read(&mut sink)).await;
    drop(client);
    let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
    assert!(
        matches!(ended, Ok(Ok(()))),
        "connection task panicked or hung"
    );
}

#[tokio::test]
async fn mutated_conversations_never_take_the_broker_down() {
    let broker = Broker::new(vec![QueueSpec::with_defaults("q")], Arc::new(AllowAll));
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    let seed = valid_conversation();
    for _ in 0..iterations(300) {
        let input = mutate(&mut rng, &seed);
        feed_and_hang_up(&broker, &input, 1 << 16, Duration::from_millis(20)).await;
    }
    // And a well-formed conversation still works afterwards.
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let serving = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.serve_connection(server).await })
    };
    client.write_all(&seed).await.expect("write");
    let mut reply = vec![0u8; 8];
    client.read_exact(&mut reply).await.expect("header");
    assert_eq!(&reply, b"AMQP\x00\x01\x00\x00");
    drop(client);
    let _ = serving.await;
}

/// A random but well-formed performative, aimed at the state machines rather than the decoder.
fn random_performative(rng: &mut Rng, message: &[u8]) -> (Performative, Vec<u8>) {
    let handle = Handle(rng.below(2) as u32);
    let addresses = [
        "q",
        "$cbs",
        "q/$management",
        "q/$DeadLetterQueue",
        "nope",
        "amqps://h:1/q",
    ];
    let address = addresses[rng.below(addresses.len())].to_string();
    let small = |rng: &mut Rng| [0u32, 1, 2, 7, u32::MAX, u32::MAX - 1][rng.below(6)];
    // Session ends and begins are rare: they usually end the connection's useful life.
    match rng.below(16) {
        0..=2 => {
            let role = if rng.below(2) == 0 {
                Role::Sender
            } else {
                Role::Receiver
            };
            let snd = if rng.below(2) == 0 {
                SenderSettleMode::Settled
            } else {
                SenderSettleMode::Unsettled
            };
            let attach = Attach {
                name: format!("link-{}", rng.below(3)),
                handle,
                role,
                snd_settle_mode: snd,
                rcv_settle_mode: ReceiverSettleMode::Second,
                source: Some(Box::new(Source::builder().address(address.clone()).build())),
                target: Some(Box::new(Target::builder().address(address).build().into())),
                unsettled: None,
                incomplete_unsettled: false,
                initial_delivery_count: Some(small(rng)),
                max_message_size: None,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            };
            (Performative::Attach(attach), Vec::new())
        }
        3..=4 => {
            let flow = Flow {
                next_incoming_id: (rng.below(2) == 0).then(|| small(rng)),
                incoming_window: small(rng),
                next_outgoing_id: small(rng),
                outgoing_window: small(rng),
                handle: (rng.below(4) != 0).then_some(handle),
                delivery_count: (rng.below(2) == 0).then(|| small(rng)),
                link_credit: Some(small(rng)),
                available: None,
                drain: rng.below(2) == 0,
                echo: rng.below(2) == 0,
                properties: None,
            };
            (Performative::Flow(flow), Vec::new())
        }
        5..=9 => {
            let tag_len = rng.below(3) * 8;
            let transfer = Transfer {
                handle,
                delivery_id: (rng.below(4) != 0).then(|| small(rng)),
                delivery_tag: Some(ByteBuf::from(rng.bytes(tag_len))),
                message_format: Some([0, 0x8001_3700][rng.below(2)]),
                settled: Some(rng.below(2) == 0),
                more: rng.below(3) == 0,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: rng.below(8) == 0,
                batchable: false,
            };
            let payload = if rng.below(2) == 0 {
                message.to_vec()
            } else {
                let len = rng.below(40);
                rng.bytes(len)
            };
            (Performative::Transfer(transfer), payload)
        }
        10..=12 => {
            let states = [
                Some(DeliveryState::Accepted(Accepted {})),
                Some(DeliveryState::Released(Released {})),
                Some(DeliveryState::Rejected(Rejected { error: None })),
                Some(DeliveryState::Modified(Modified {
                    delivery_failed: Some(true),
                    undeliverable_here: Some(rng.below(2) == 0),
                    message_annotations: None,
                })),
                None,
            ];
            let disposition = Disposition {
                role: if rng.below(4) == 0 {
                    Role::Sender
                } else {
                    Role::Receiver
                },
                first: small(rng),
                last: (rng.below(2) == 0).then(|| small(rng)),
                settled: rng.below(2) == 0,
                state: states[rng.below(states.len())].clone(),
                batchable: false,
            };
            (Performative::Disposition(disposition), Vec::new())
        }
        13 => (
            Performative::Detach(Detach {
                handle,
                closed: rng.below(2) == 0,
                error: None,
            }),
            Vec::new(),
        ),
        14 => (Performative::End(End { error: None }), Vec::new()),
        _ => (
            Performative::Begin(Begin {
                remote_channel: (rng.below(4) == 0).then_some(0),
                next_outgoing_id: small(rng),
                incoming_window: small(rng),
                outgoing_window: small(rng),
                handle_max: Handle(small(rng)),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
            Vec::new(),
        ),
    }
}

#[tokio::test]
async fn random_performative_sequences_never_take_the_broker_down() {
    let broker = Broker::new(vec![QueueSpec::with_defaults("q")], Arc::new(AllowAll));
    let mut rng = Rng(0x5eed_1234_abcd_0003);
    let message = serde_amqp::to_vec(&Serializable(
        Message::builder().data(Binary::from(vec![9u8; 32])).build(),
    ))
    .expect("encode");
    let opening = valid_conversation();
    // Header, open and begin only: the random part starts from an open session.
    let mut prefix = BytesMut::from(&opening[..]);
    let mut kept = prefix.split_to(8).to_vec();
    for _ in 0..2 {
        if let Ok(Some(raw)) = frame::take_frame(&mut prefix, 1 << 20) {
            let mut out = BytesMut::new();
            let decoded = frame::decode_amqp(raw).expect("valid");
            let performative = decoded.performative.expect("performative");
            frame::encode_frame(&mut out, FRAME_TYPE_AMQP, 0, &performative, &[]).expect("encode");
            kept.extend_from_slice(&out);
        }
    }
    // Then a put-token, so the random links are authorised and reach the broker's logic.
    let cbs = Attach {
        name: "cbs".into(),
        handle: Handle(10),
        role: Role::Sender,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(Source::builder().address("cbs-client").build())),
        target: Some(Box::new(Target::builder().address("$cbs").build().into())),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    let mut props = ApplicationProperties::default();
    props
        .0
        .insert("operation".into(), SimpleValue::String("put-token".into()));
    props.0.insert(
        "name".into(),
        SimpleValue::String("sb://localhost/q".into()),
    );
    let put_token = serde_amqp::to_vec(&Serializable(
        Message::builder()
            .application_properties(props)
            .value("token".to_string())
            .build(),
    ))
    .expect("encode");
    let put_token_transfer = Transfer {
        handle: Handle(10),
        delivery_id: Some(0),
        delivery_tag: Some(ByteBuf::from(vec![0])),
        message_format: Some(0),
        settled: Some(true),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    let mut authorised = BytesMut::new();
    frame::encode_frame(
        &mut authorised,
        FRAME_TYPE_AMQP,
        0,
        &Performative::Attach(cbs),
        &[],
    )
    .expect("encode");
    frame::encode_frame(
        &mut authorised,
        FRAME_TYPE_AMQP,
        0,
        &Performative::Transfer(put_token_transfer),
        &put_token,
    )
    .expect("encode");
    kept.extend_from_slice(&authorised);
    // And a sender (handle 0) and a receiver (handle 1) on the queue for the random frames to use.
    for (handle, role) in [(0, Role::Sender), (1, Role::Receiver)] {
        let attach = Attach {
            name: format!("base-{handle}"),
            handle: Handle(handle),
            role,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::Second,
            source: Some(Box::new(Source::builder().address("q").build())),
            target: Some(Box::new(Target::builder().address("q").build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let mut out = BytesMut::new();
        frame::encode_frame(
            &mut out,
            FRAME_TYPE_AMQP,
            0,
            &Performative::Attach(attach),
            &[],
        )
        .expect("encode");
        kept.extend_from_slice(&out);
    }
    for _ in 0..iterations(300) {
        let mut input = BytesMut::from(&kept[..]);
        for _ in 0..rng.below(30) {
            let (performative, payload) = random_performative(&mut rng, &message);
            let channel = if rng.below(32) == 0 { 1 } else { 0 };
            frame::encode_frame(
                &mut input,
                FRAME_TYPE_AMQP,
                channel,
                &performative,
                &payload,
            )
            .expect("encode");
        }
        feed_and_hang_up(&broker, &input, 1 << 20, Duration::from_millis(5)).await;
    }
    // Some random sends got through: the state machines were reached, not just the decoder.
    let stats = broker.queue_stats("q").expect("queue");
    assert!(stats.active_messages + stats.dead_letter_messages > 0);
}
