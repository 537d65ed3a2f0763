//! The producer job: send MESSAGE_COUNT messages in as few batches as fit, and succeed only
//! when the broker accepted every one of them.
//!
//! A batch that fails transiently is sent again on a new connection with the same message
//! ids; if the broker had in fact stored it before the connection dropped, the queue's
//! duplicate detection (when enabled) recognises the ids. Delivery is at least once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::auth::Credentials;
use crate::config::{CommonConfig, ProducerConfig};
use crate::servicebus::diagnostics::trace_properties;
use crate::servicebus::sender::{encode, BatchBuilder, OutgoingBatch, PendingSend};
use crate::servicebus::{retry, retry_after, OutgoingMessage, QueueSender, ServiceBusError};
use crate::telemetry::{Metrics, Readiness};

/// The run's messages, made as they are needed: the configured body, a fresh unique id
/// each, and application properties that let a reader tell where a message came from.
pub fn messages<'a>(
    config: &'a ProducerConfig,
    trace: &'a [(String, String)],
) -> impl Iterator<Item = OutgoingMessage> + 'a {
    let body: Arc<[u8]> = config.body.as_bytes().into();
    (0..config.message_count).map(move |index| {
        let mut application_properties = vec![
            ("source".to_string(), "servicebusdemo".to_string()),
            ("index".to_string(), index.to_string()),
        ];
        application_properties.extend_from_slice(trace);
        OutgoingMessage {
            message_id: message_id(),
            body: Arc::clone(&body),
            application_properties,
        }
    })
}

/// A fresh random (version 4) message id. Drawn from the thread's CSPRNG rather than one
/// getrandom system call per id, which was 12% of the producer's profile.
fn message_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
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
    let sender = open(config, common, &credentials, &metrics).await?;
    readiness.set_ready(true);
    tracing::info!(
        queue = config.queue.as_str(),
        messages = config.message_count,
        max_message_size = sender.max_message_size(),
        "sending"
    );
    let mut run = Run {
        config,
        common,
        credentials: &credentials,
        metrics: &metrics,
        sender,
        in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
        progress: Progress::default(),
    };
    // Messages are built and encoded as the batches fill, so memory stays at the batches in
    // flight plus the one being built however many messages are asked for.
    let mut batch = BatchBuilder::new(run.sender.max_message_size());
    for message in messages(config, &trace) {
        let encoded = encode(&message)?;
        if let Some(encoded) = batch.try_push(encoded)? {
            run.send(OutgoingBatch::new(batch.take())).await?;
            if batch.try_push(encoded)?.is_some() {
                return Err(ServiceBusError::MessageTooLarge(
                    "a message does not fit an empty batch".into(),
                ));
            }
        }
    }
    if !batch.is_empty() {
        run.send(OutgoingBatch::new(batch.take())).await?;
    }
    run.finish().await?;
    let progress = run.progress;
    if progress.sent == 0 {
        tracing::info!(queue = config.queue.as_str(), "Sent 0 messages");
    }
    tracing::info!(
        queue = config.queue.as_str(),
        messages = progress.sent,
        batches = progress.batches,
        "every message accepted"
    );
    run.sender.close().await;
    Ok(progress.sent)
}

#[derive(Default)]
struct Progress {
    sent: u64,
    batches: u64,
}

/// A batch handed to the link whose answer has not been read yet.
struct InFlight {
    batch: OutgoingBatch,
    /// `Err` when handing it over already failed: `finish` retries it like a failed answer.
    pending: Result<PendingSend, ServiceBusError>,
    started: Instant,
    span: tracing::Span,
}

/// The sending side of one producer run: up to MAX_IN_FLIGHT batches handed to the link
/// without their answers, the next one built meanwhile. When an answer says the send failed
/// (or the connection is gone), that batch and every later one in flight are sent again, in
/// order, on a new connection (at least once: a batch the broker had stored becomes a
/// duplicate). So the duplicates a lost connection can cause are bounded by what was in flight.
struct Run<'a> {
    config: &'a ProducerConfig,
    common: &'a CommonConfig,
    credentials: &'a Arc<Credentials>,
    metrics: &'a Arc<Metrics>,
    sender: QueueSender,
    in_flight: VecDeque<InFlight>,
    progress: Progress,
}

/// Batches handed over before the oldest answer is awaited. One alone left the link idle
/// while the broker answered; two measured a third more throughput (10,000 messages, medians
/// of three runs against sblocal: 475,000 -> 640,000 msg/s), four no more than two.
const MAX_IN_FLIGHT: usize = 2;

impl Run<'_> {
    /// Hand this batch over once fewer than MAX_IN_FLIGHT are unanswered.
    async fn send(&mut self, batch: OutgoingBatch) -> Result<(), ServiceBusError> {
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            self.finish_oldest().await?;
        }
        let span = tracing::info_span!(
            "send batch",
            queue = self.config.queue.as_str(),
            messages = batch.messages()
        );
        let started = Instant::now();
        let pending = self
            .sender
            .start_send(&batch)
            .instrument(span.clone())
            .await;
        self.in_flight.push_back(InFlight {
            batch,
            pending,
            started,
            span,
        });
        Ok(())
    }

    /// Read every answer still to come.
    async fn finish(&mut self) -> Result<(), ServiceBusError> {
        while !self.in_flight.is_empty() {
            self.finish_oldest().await?;
        }
        Ok(())
    }

    /// Read the oldest batch's answer and count it. After a failure, it and the later batches
    /// in flight (their link went with the connection) are sent again on a new connection.
    async fn finish_oldest(&mut self) -> Result<(), ServiceBusError> {
        let Some(InFlight {
            batch,
            pending,
            started,
            span,
        }) = self.in_flight.pop_front()
        else {
            return Ok(());
        };
        let answered = match pending {
            // Through the sender, which notices a closed connection at once.
            Ok(pending) => self.sender.outcome(pending).instrument(span.clone()).await,
            Err(err) => Err(err),
        };
        if let Err(err) = answered {
            self.resend(&batch, err).instrument(span).await?;
            self.count(&batch, started);
            return self.resend_the_rest_in_flight().await;
        }
        self.count(&batch, started);
        Ok(())
    }

    /// After a resend on a new connection: the batches that were in flight behind the failed
    /// one went with the old link, so they follow it, in order, one at a time.
    async fn resend_the_rest_in_flight(&mut self) -> Result<(), ServiceBusError> {
        for later in std::mem::take(&mut self.in_flight) {
            tracing::info!(
                messages = later.batch.messages(),
                "resending a batch that was in flight on the lost connection"
            );
            if let Err(err) = self.sender.send_batch(&later.batch).await {
                self.resend(&later.batch, err)
                    .instrument(later.span)
                    .await?;
            }
            self.count(&later.batch, later.started);
        }
        Ok(())
    }

    fn count(&mut self, batch: &OutgoingBatch, started: Instant) {
        let queue = self.config.queue.as_str();
        let messages = batch.messages() as u64;
        self.metrics.observe_send(queue, started.elapsed());
        self.metrics.message_sent(queue, messages);
        self.progress.sent += messages;
        self.progress.batches += 1;
        tracing::info!(queue, "Sent {} messages", self.progress.sent);
    }

    /// After a failed send: while the failure is transient and attempts are left, send the
    /// batch again on a new connection (one connection per attempt, under one backoff).
    async fn resend(
        &mut self,
        batch: &OutgoingBatch,
        failed: ServiceBusError,
    ) -> Result<(), ServiceBusError> {
        let (config, common, credentials, metrics) =
            (self.config, self.common, self.credentials, self.metrics);
        let fresh = retry_after("send", &common.retry, failed, |_| async move {
            metrics.reconnect();
            send_on_new_connection(config, common, credentials, batch).await
        })
        .await?;
        std::mem::replace(&mut self.sender, fresh).close().await;
        Ok(())
    }
}

/// Connect once (no retries of its own: the caller's retry covers connect and send
/// together) and send `batch`; the sender is returned once the broker accepted it.
async fn send_on_new_connection(
    config: &ProducerConfig,
    common: &CommonConfig,
    credentials: &Arc<Credentials>,
    batch: &OutgoingBatch,
) -> Result<QueueSender, ServiceBusError> {
    let mut sender = QueueSender::open(
        &common.namespace,
        credentials.clone(),
        &config.queue,
        common.operation_timeout,
    )
    .await?;
    // Through the sender, which notices a closed connection at once.
    match sender.send_batch(batch).await {
        Ok(()) => Ok(sender),
        Err(err) => {
            sender.close().await;
            Err(err)
        }
    }
}

/// Connect for the run's first batch, retrying while the failure is transient.
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
        assert!(messages.iter().all(|m| &*m.body == b"Hello World!"));
        assert!(messages.iter().all(|m| m
            .application_properties
            .iter()
            .filter(|(k, v)| (k == DIAGNOSTIC_ID || k == TRACEPARENT) && v == traceparent)
            .count()
            == 2));
    }
}
