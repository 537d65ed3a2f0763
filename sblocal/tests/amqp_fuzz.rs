//! Randomised input against the frame decoder, the value measurer and whole connections:
//! nothing may panic, and the broker keeps serving other clients. A fixed-seed generator keeps
//! failures reproducible; `SBLOCAL_FUZZ_ITERATIONS` raises the effort.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{Message, Source, Target};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Flow, MaxFrameSize, Open, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::Binary;
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

#[tokio::test]
async fn mutated_conversations_never_take_the_broker_down() {
    let broker = Broker::new(vec![QueueSpec::with_defaults("q")], Arc::new(AllowAll));
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    let seed = valid_conversation();
    for _ in 0..iterations(300) {
        let input = mutate(&mut rng, &seed);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = {
            let broker = broker.clone();
            tokio::spawn(async move { broker.serve_connection(server).await })
        };
        let _ = client.write_all(&input).await;
        // Read whatever comes back, then hang up: the connection task must end on its own.
        let mut sink = vec![0u8; 1 << 16];
        let _ = tokio::time::timeout(Duration::from_millis(20), client.read(&mut sink)).await;
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "connection task panicked or hung"
        );
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
