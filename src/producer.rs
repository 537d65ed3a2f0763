//! The producer job: send MESSAGE_COUNT messages in as few batches as fit, and succeed only
//! when the broker accepted every one of them.
//!
//! A batch that fails transiently is sent again on a new connection with the same message
//! ids; if the broker had in fact stored it before the connection dropped, the queue's
//! duplicate detection (when enabled) recognises the ids. Delivery is at least once.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Credentials;
use crate::config::{CommonConfig, ProducerConfig};
use crate::servicebus::sender::{encode, pack};
use crate::servicebus::{retry, OutgoingMessage, QueueSender, ServiceBusError};
use crate::telemetry::{Metrics, Readiness};

/// Build the run's messages: the configured body, a fresh unique id each, and application
/// properties that let a reader tell where a message came from.
pub fn build_messages(config: &ProducerConfig) -> Vec<OutgoingMessage> {
    (0..config.message_count)
        .map(|index| OutgoingMessage {
            message_id: uuid::Uuid::new_v4().to_string(),
            body: config.body.as_bytes().to_vec(),
            application_properties: vec![
                ("source".to_string(), "servicebusdemo".to_string()),
                ("index".to_string(), index.to_string()),
            ],
        })
        .collect()
}

pub async fn run(
    config: &ProducerConfig,
    common: &CommonConfig,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> Result<u64, ServiceBusError> {
    let messages = build_messages(config);
    let encoded = messages.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    let mut sender = open(config, common, &credentials, &metrics).await?;
    readiness.set_ready(true);
    let batches = pack(&encoded, sender.max_message_size())?;
    tracing::info!(
        queue = config.queue.as_str(),
        messages = encoded.len(),
        batches = batches.len(),
        max_message_size = sender.max_message_size(),
        "sending"
    );
    let mut sent = 0u64;
    for range in batches {
        let batch = &encoded[range];
        let started = Instant::now();
        sender = send_with_retry(sender, batch, config, common, &credentials, &metrics).await?;
        metrics.observe_send(&config.queue, started.elapsed());
        metrics.message_sent(&config.queue, batch.len() as u64);
        sent += batch.len() as u64;
        tracing::info!(queue = config.queue.as_str(), "Sent {sent} messages");
    }
    if sent == 0 {
        tracing::info!(queue = config.queue.as_str(), "Sent 0 messages");
    }
    sender.close().await;
    Ok(sent)
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

    #[test]
    fn messages_have_unique_ids_and_the_body() {
        let config = ProducerConfig {
            queue: "q".into(),
            message_count: 100,
            body: "Hello World!".into(),
        };
        let messages = build_messages(&config);
        assert_eq!(messages.len(), 100);
        let ids: std::collections::HashSet<_> = messages.iter().map(|m| &m.message_id).collect();
        assert_eq!(ids.len(), 100);
        assert!(messages.iter().all(|m| m.body == b"Hello World!"));
    }
}
