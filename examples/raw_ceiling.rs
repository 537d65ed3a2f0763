//! The broker's ceiling: a bare fe2o3-amqp client that sends pre-encoded Service Bus batches
//! with several in flight, or receives with a large credit and completes every message, as
//! fast as the broker allows. Nothing of the product is on this path, so the product's
//! numbers can be read against it.
//!
//! ```text
//! raw_ceiling send    COUNT SIZE [IN_FLIGHT]   # default 8 batches in flight
//! raw_ceiling receive COUNT [CREDIT]           # default credit 1000
//! ```
//!
//! Reads `AZURE_SERVICEBUS_CONNECTION_STRING` (a SAS connection string to the plain AMQP port,
//! as `sblocal`'s `emulator.env` writes it) and `AZURE_SERVICEBUS_QUEUE_NAME`. Prints one JSON
//! line: `{"mode":…,"messages":…,"seconds":…,"per_second":…}`. The clock starts after the link
//! is attached and stops when the broker has accepted the last batch (send) or the last
//! completion has been written (receive).

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::{Batch, Body, Data, Message, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{Binary, Timestamp, Value};
use fe2o3_amqp::{Connection, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use sha2::Sha256;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Message format of a Service Bus batch transfer.
const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;
/// Room kept below the link's maximum message size for the batch's own framing.
const BATCH_HEADROOM: u64 = 64;

struct Target {
    host: String,
    port: u16,
    key_name: String,
    key: String,
    queue: String,
}

impl Target {
    fn from_env() -> Result<Self, BoxError> {
        let connection_string = std::env::var("AZURE_SERVICEBUS_CONNECTION_STRING")
            .map_err(|_| "AZURE_SERVICEBUS_CONNECTION_STRING is not set")?;
        let queue = std::env::var("AZURE_SERVICEBUS_QUEUE_NAME")
            .map_err(|_| "AZURE_SERVICEBUS_QUEUE_NAME is not set")?;
        let field = |name: &str| {
            connection_string
                .split(';')
                .filter_map(|part| part.split_once('='))
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.to_string())
                .ok_or_else(|| format!("the connection string has no {name}"))
        };
        let endpoint = field("Endpoint")?;
        let authority = endpoint
            .trim_start_matches("sb://")
            .trim_end_matches('/')
            .to_string();
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), port.parse()?),
            None => (authority, 5672),
        };
        Ok(Self {
            host,
            port,
            key_name: field("SharedAccessKeyName")?,
            key: field("SharedAccessKey")?,
            queue,
        })
    }

    fn audience(&self) -> String {
        format!("sb://{}/{}", self.host, self.queue)
    }

    /// A SAS token for the queue, valid for an hour.
    fn sas_token(&self) -> Result<(String, i64), BoxError> {
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
        let resource = utf8_percent_encode(&self.audience(), NON_ALPHANUMERIC).to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.as_bytes())?;
        mac.update(format!("{resource}\n{expiry}").as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let signature = utf8_percent_encode(&signature, NON_ALPHANUMERIC);
        let token = format!(
            "SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn={}",
            self.key_name
        );
        Ok((token, i64::try_from(expiry)? * 1000))
    }
}

/// Connection, session and an authorised queue.
async fn open(
    target: &Target,
) -> Result<
    (
        fe2o3_amqp::connection::ConnectionHandle<()>,
        SessionHandle<()>,
    ),
    BoxError,
> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await?;
    tcp.set_nodelay(true)?;
    let mut connection = Connection::builder()
        .container_id(format!("raw-ceiling-{}", uuid::Uuid::new_v4()))
        .hostname(target.host.as_str())
        .sasl_profile(SaslProfile::Anonymous)
        .max_frame_size(256 * 1024)
        .scheme("amqp")
        .open_with_stream(tcp)
        .await?;
    let mut session = Session::begin(&mut connection).await?;
    let mut cbs = CbsClient::builder()
        .management_node_address("$cbs")
        .client_node_addr("$cbs")
        .attach(&mut session)
        .await?;
    let (token, expires_ms) = target.sas_token()?;
    let token = CbsToken::new(
        token,
        "servicebus.windows.net:sastoken",
        Some(Timestamp::from_milliseconds(expires_ms)),
    );
    cbs.put_token(target.audience(), token).await?;
    cbs.close().await?;
    Ok((connection, session))
}

/// One encoded message of `size` body bytes, as it travels inside a batch's data section.
fn encoded_message(index: u64, size: usize) -> Result<Vec<u8>, BoxError> {
    let message = Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String(format!("raw-{index}"))),
            ..Default::default()
        })
        .data(Binary::from(vec![b'x'; size]))
        .build();
    Ok(serde_amqp::to_vec(&Serializable(message))?)
}

/// Batches of pre-encoded messages, each filled up to the link's maximum message size.
fn batches(
    count: u64,
    size: usize,
    max_message_size: u64,
) -> Result<Vec<Sendable<Batch<Data>>>, BoxError> {
    let one = encoded_message(0, size)?;
    let section = one.len() as u64 + 8;
    let per_batch = ((max_message_size.saturating_sub(BATCH_HEADROOM)) / section).max(1);
    let mut batches = Vec::new();
    let mut index = 0;
    while index < count {
        let in_this = per_batch.min(count - index);
        let sections = (index..index + in_this)
            .map(|i| encoded_message(i, size).map(|bytes| Data(Binary::from(bytes))))
            .collect::<Result<Vec<_>, _>>()?;
        index += in_this;
        let message = Message::builder().body(Batch::new(sections)).build();
        batches.push(
            Sendable::builder()
                .message(message)
                .message_format(BATCH_MESSAGE_FORMAT)
                .settled(false)
                .build(),
        );
    }
    Ok(batches)
}

async fn send(
    target: &Target,
    count: u64,
    size: usize,
    in_flight: usize,
) -> Result<Duration, BoxError> {
    let (mut connection, mut session) = open(target).await?;
    let mut sender = Sender::builder()
        .name(format!("raw-sender-{}", uuid::Uuid::new_v4()))
        .target(target.queue.as_str())
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .attach(&mut session)
        .await?;
    let max_message_size = sender
        .max_message_size()
        .filter(|size| *size > 0)
        .unwrap_or(256 * 1024);
    // Encoding happens before the clock starts: this measures the broker, not the encoder.
    let batches = batches(count, size, max_message_size)?;
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(in_flight);
    for batch in batches {
        if pending.len() >= in_flight {
            if let Some(outcome) = pending.pop_front() {
                expect_accepted(outcome.await?)?;
            }
        }
        pending.push_back(sender.send_batchable(batch).await?);
    }
    for outcome in pending {
        expect_accepted(outcome.await?)?;
    }
    let elapsed = started.elapsed();
    sender.close().await?;
    session.end().await?;
    connection.close().await?;
    Ok(elapsed)
}

fn expect_accepted(outcome: Outcome) -> Result<(), BoxError> {
    match outcome {
        Outcome::Accepted(_) => Ok(()),
        other => Err(format!("batch not accepted: {other:?}").into()),
    }
}

async fn receive(target: &Target, count: u64, credit: u32) -> Result<Duration, BoxError> {
    let (mut connection, mut session) = open(target).await?;
    let mut receiver = Receiver::builder()
        .name(format!("raw-receiver-{}", uuid::Uuid::new_v4()))
        .source(target.queue.as_str())
        .target(format!("raw-{}", uuid::Uuid::new_v4()))
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .credit_mode(CreditMode::Auto(credit))
        .attach(&mut session)
        .await?;
    let mut started = None;
    for _ in 0..count {
        let delivery = receiver.recv::<Body<Value>>().await?;
        started.get_or_insert_with(Instant::now);
        receiver.accept(&delivery).await?;
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    receiver.close().await?;
    session.end().await?;
    connection.close().await?;
    Ok(elapsed)
}

fn arg<T: std::str::FromStr>(
    args: &[String],
    index: usize,
    default: Option<T>,
) -> Result<T, BoxError> {
    match args.get(index) {
        Some(text) => text
            .parse()
            .map_err(|_| format!("argument {index} ({text:?}) is not a number").into()),
        None => default.ok_or_else(|| format!("argument {index} is missing").into()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let target = Target::from_env()?;
    let mode = args.get(1).map(String::as_str).unwrap_or_default();
    let count: u64 = arg(&args, 2, None)?;
    let (elapsed, timed) = match mode {
        "send" => {
            let size: usize = arg(&args, 3, Some(1024))?;
            let in_flight: usize = arg(&args, 4, Some(8))?;
            (send(&target, count, size, in_flight.max(1)).await?, count)
        }
        "receive" => {
            let credit: u32 = arg(&args, 3, Some(1000))?;
            // The first message starts the clock.
            (
                receive(&target, count, credit.max(1)).await?,
                count.saturating_sub(1),
            )
        }
        _ => {
            return Err(
                "usage: raw_ceiling send COUNT [SIZE [IN_FLIGHT]] | receive COUNT [CREDIT]".into(),
            )
        }
    };
    let seconds = elapsed.as_secs_f64();
    let per_second = if seconds > 0.0 {
        timed as f64 / seconds
    } else {
        0.0
    };
    println!(
        "{{\"mode\":\"raw-{mode}\",\"messages\":{count},\"seconds\":{seconds:.4},\"per_second\":{per_second:.1}}}"
    );
    Ok(())
}
