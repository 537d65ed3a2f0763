//! The producer job: send MESSAGE_COUNT messages in as few batches as fit, and succeed only
//! when the broker accepted every one of them.
//!
//! A batch that fails transiently is sent again on a new connection with the same message
//! ids; if the broker had in fact stored it before the connection dropped, the queue's
//! duplicate detection (when enabled) recognises the ids. Delivery is at least once.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::auth::Credentials;
use crate::config::{CommonConfig, ProducerConfig};
use crate::servicebus::diagnostics::trace_properties;
use crate::servicebus::sender::{encode, BatchBuilder};
use crate::servicebus::{retry, OutgoingMessage, QueueSender, ServiceBusError};
use crate::telemetry::{Metrics, Readiness};

/// The run's messages, made as they are needed: the configured body, a fresh unique id
/// each, and application properties that let a reader tell where a message came from.
pub fn messages<'a>(
    config: &'a ProducerConfig,
    trace: &'a [(String, String)],
) -> impl Iterator<Item = OutgoingMessage> + 'a {
    (0..config.message_count).map(move |index| {
        let mut application_properties = vec![
            ("source".to_string(), "servicebusdemo".to_string()),
            ("index".to_string(), index.to_string()),
        ];
        application_properties.extend_from_slice(trace);
        OutgoingMessage {
            message_id: uuid::Uuid::new_v4().to_string(),
            body: config.body.as_bytes().to_vec(),
            application_properties,
        }
    })
}

pub async fn run(
    config: &ProducerConfig,
    common: &CommonConfig,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> Result<u64, ServiceBusError> {
    let span = tracing::info_span!(
        "produce",
        queue = config.queue.as_str(),
        messages = config.message_count
    );
    produce(config, common, credentials, metrics, readiness)
        .instrument(span)
        .await
}

async fn produce(
    config: &ProducerConfig,
    common: &CommonConfig,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> Result<u64, ServiceBusError> {
    // Every message continues this run's trace (when traces are exported).
    let trace = trace_properties();
    let mut sender = open(config, common, &credentials, &metrics).await?;
    readiness.set_ready(true);
    tracing::info!(
        queue = config.queue.as_str(),
        messages = config.message_count,
        max_message_size = sender.max_message_size(),
        "sending"
    );
    // Messages are built and encoded as the batches fill, so memory stays at one batch
    // however many messages are asked for.
    let mut batch = BatchBuilder::new(sender.max_message_size());
    let mut progress = Progress::default();
    for message in messages(config, &trace) {
        let encoded = encode(&message)?;
        if let Some(encoded) = batch.try_push(encoded)? {
            sender = flush(
                sender,
                &mut batch,
                &mut progress,
                config,
                common,
                &credentials,
                &metrics,
            )
            .await?;
            if batch.try_push(encoded)?.is_some() {
                return Err(ServiceBusError::MessageTooLarge(
                    "a message does not fit an empty batch".into(),
                ));
            }
        }
    }
    if !batch.is_empty() {
        sender = flush(
            sender,
            &mut batch,
            &mut progress,
            config,
            common,
            &credentials,
            &metrics,
        )
        .await?;
    }
    if progress.sent == 0 {
        tracing::info!(queue = config.queue.as_str(), "Sent 0 messages");
    }
    tracing::info!(
        queue = config.queue.as_str(),
        messages = progress.sent,
        batches = progress.batches,
        "every message accepted"
    );
    sender.close().await;
    Ok(progress.sent)
}

#[derive(Default)]
struct Progress {
    sent: u64,
    batches: u64,
}

/// Send the collected batch and log progress.
async fn flush(
    sender: QueueSender,
    batch: &mut BatchBuilder,
    progress: &mut Progress,
    config: &ProducerConfig,
    common: &CommonConfig,
    credentials: &Arc<Credentials>,
    metrics: &Arc<Metrics>,
) -> Result<QueueSender, ServiceBusError> {
    let encoded = batch.take();
    let started = Instant::now();
    let span = tracing::info_span!(
        "send batch",
        queue = config.queue.as_str(),
        messages = encoded.len()
    );
    let sender = send_with_retry(sender, &encoded, config, common, credentials, metrics)
        .instrument(span)
        .await?;
    metrics.observe_send(&config.queue, started.elapsed());
    metrics.message_sent(&config.queue, encoded.len() as u64);
    progress.sent += encoded.len() as u64;
    progress.batches += 1;
    tracing::info!(
        queue = config.queue.as_str(),
        "Sent {} messages",
        progress.sent
    );
    Ok(sender)
}

async fn open(
    config: &ProducerConfig,
    common: &CommonConfig,
    credentials: &Arc<Credentials>,
    metrics: &Arc<Metrics>,
) -> Result<QueueSender, ServiceBusError> {
    retry("connect", &common.retry, |attempt| {
        if attempt > 0 {
            metrics.reconnect();
        }
        QueueSender::open(
            &common.namespace,
            credentials.clone(),
            &config.queue,
            common.operation_timeout,
        )
    })
    .await
}

/// Send one batch; on a transient failure reconnect and send it again.
async fn send_with_retry(
    mut sender: QueueSender,
    batch: &[Vec<u8>],
    config: &ProducerConfig,
    common: &CommonConfig,
    credentials: &Arc<Credentials>,
    metrics: &Arc<Metrics>,
) -> Result<QueueSender, ServiceBusError> {
    let mut attempt = 0;
    loop {
        match sender.send_batch(batch).await {
            Ok(()) => return Ok(sender),
            Err(err) if err.is_transient() && attempt < common.retry.max_attempts => {
                attempt += 1;
                let delay = crate::servicebus::backoff_delay(&common.retry, attempt);
                tracing::warn!(error = %err, attempt, delay_ms = delay.as_millis() as u64,
                    "send failed transiently; reconnecting");
                sender.close().await;
                tokio::time::sleep(delay).await;
                metrics.reconnect();
                sender = open(config, common, credentials, metrics).await?;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::servicebus::diagnostics::{DIAGNOSTIC_ID, TRACEPARENT};

    #[test]
    fn messages_have_unique_ids_and_the_body() {
        let config = ProducerConfig {
            queue: "q".into(),
            message_count: 100,
            body: "Hello World!".into(),
        };
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let trace = [
            (TRACEPARENT.to_string(), traceparent.to_string()),
            (DIAGNOSTIC_ID.to_string(), traceparent.to_string()),
        ];
        let messages: Vec<_> = messages(&config, &trace).collect();
        assert_eq!(messages.len(), 100);
        let ids: std::collections::HashSet<_> = messages.iter().map(|m| &m.message_id).collect();
        assert_eq!(ids.len(), 100);
        assert!(messages.iter().all(|m| m.body == b"Hello World!"));
        assert!(messages.iter().all(|m| m
            .application_properties
            .iter()
            .filter(|(k, v)| (k == DIAGNOSTIC_ID || k == TRACEPARENT) && v == traceparent)
            .count()
            == 2));
    }
}
