//! The consumer: a Job that takes MESSAGE_COUNT messages (or, with 0, a worker that runs until
//! stopped), logs each, and completes it after processing.
//!
//! - Credit (prefetch) never exceeds the messages still wanted, so one Job does not lock
//!   messages that the other Jobs of a ScaledJob should get.
//! - A body that is not text is dead-lettered (`UndecodableBody`); processing that fails is
//!   abandoned and retried, then dead-lettered (`ProcessingFailed`) once it has been tried
//!   MAX_PROCESSING_ATTEMPTS times. Dead-lettered messages count toward MESSAGE_COUNT.
//! - On SIGTERM: no new credit, the message being processed and every prefetched one are
//!   abandoned (redelivered at once to someone else), finished ones are already settled.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::Instrument;

use crate::auth::Credentials;
use crate::config::{CommonConfig, ConsumerConfig};
use crate::servicebus::diagnostics::continue_trace;
use crate::servicebus::{backoff_delay, retry, QueueReceiver, ReceivedMessage, ServiceBusError};
use crate::telemetry::{self, Metrics, Readiness, SettleOutcome};

/// How long a continuous worker waits in one receive call before looking around again.
const CONTINUOUS_WAIT: Duration = Duration::from_secs(60);
/// How long to wait for prefetched messages still in flight when stopping.
const DRAIN_WAIT: Duration = Duration::from_millis(300);
/// Renew a lock this long before it expires (or at half its remaining time, if shorter).
const RENEW_MARGIN: Duration = Duration::from_secs(10);
/// Below this much lock time left, a renewal is not attempted.
const MIN_RENEW_WINDOW: Duration = Duration::from_millis(200);

/// Why the consumer stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// MESSAGE_COUNT messages were handled.
    Done,
    /// The queue stayed empty for CONSUMER_IDLE_TIMEOUT.
    Idle,
    /// SIGTERM / SIGINT.
    Signal,
}

/// What the run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub completed: u64,
    pub dead_lettered: u64,
    pub abandoned: u64,
    pub stop: StopReason,
}

/// What happened to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disposition {
    Completed,
    DeadLettered,
    /// Given back for another attempt (processing failed, or we are stopping).
    Abandoned,
}

/// How to settle a message: the disposition, and for a dead-letter its reason and
/// description.
struct Settlement<'a> {
    disposition: Disposition,
    reason: &'a str,
    description: &'a str,
}

impl<'a> Settlement<'a> {
    fn plain(disposition: Disposition) -> Self {
        Self {
            disposition,
            reason: "",
            description: "",
        }
    }

    fn dead_letter(reason: &'a str, description: &'a str) -> Self {
        Self {
            disposition: Disposition::DeadLettered,
            reason,
            description,
        }
    }
}

/// The credit to grant: at least one (to receive at all), at most PREFETCH, never more
/// than the messages still wanted (`None` = unbounded, the continuous worker).
pub fn desired_credit(prefetch: u32, still_wanted: Option<u64>) -> u32 {
    let base = prefetch.max(1);
    match still_wanted {
        Some(wanted) => base.min(u32::try_from(wanted).unwrap_or(u32::MAX)),
        None => base,
    }
}

struct Consumer<'a> {
    config: &'a ConsumerConfig,
    common: &'a CommonConfig,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    summary: Summary,
    /// Received but not finished when a stop was requested.
    unfinished: Vec<ReceivedMessage>,
    /// Connections lost in a row with no progress in between.
    losses: LossStreak,
}

/// A reconnected link that stays up this long counts as progress, as a message does.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);

/// Connections lost in a row with no message and no stable connection in between. A broker
/// that accepts us and drops us again at once (an authorisation it keeps refusing after the
/// attach, say) meets a growing backoff and, after the retry budget, an error instead of a
/// reconnect loop; a quiet worker whose connection is dropped now and then never runs out.
#[derive(Default)]
struct LossStreak {
    count: AtomicU32,
    connected_at: std::sync::Mutex<Option<Instant>>,
}

impl LossStreak {
    /// Counts a lost connection; returns how many in a row, this one included.
    fn lost(&self) -> u32 {
        self.lost_at(Instant::now())
    }

    fn lost_at(&self, now: Instant) -> u32 {
        let connected_at = *self
            .connected_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if connected_at.is_some_and(|at| now.saturating_duration_since(at) >= STABLE_CONNECTION) {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn reconnected(&self) {
        *self
            .connected_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    fn progressed(&self) {
        self.count.store(0, Ordering::Relaxed);
    }
}

/// Run the consumer on a thread of its own with a single-threaded runtime, which also hosts
/// fe2o3's connection and session tasks (they are spawned from it). With PREFETCH=0 every
/// message is a round trip through those tasks; on the multi-threaded runtime each step was a
/// wake-up on another thread, and that halved the throughput (measured: a bare fe2o3 receiver
/// at credit 1 did about 15,000 msg/s on one thread and 9,000 with its loop on the main thread
/// of a multi-threaded runtime). Metrics, health endpoints and signals stay on the main runtime.
pub async fn run(
    config: &ConsumerConfig,
    common: &CommonConfig,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, ServiceBusError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done, finished) = tokio::sync::oneshot::channel();
    let (config, common) = (config.clone(), common.clone());
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("consumer".into())
        .spawn(move || {
            // One write for the lines of each message, once its settlement is sent.
            telemetry::buffer_this_thread();
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(telemetry::flush_this_thread)
                .build()
            {
                // A task rather than the block_on future itself: a task woken by another
                // task runs in the same scheduler turn, whereas a woken block_on future makes
                // the runtime poll the network first (one more syscall per message).
                Ok(runtime) => runtime.block_on(async move {
                    let consumer = async move {
                        let stop = async {
                            // A dropped sender (the caller went away) also means stop.
                            let _ = stopped.await;
                        };
                        consume(&config, &common, credentials, metrics, readiness, stop).await
                    };
                    tokio::spawn(consumer.instrument(span))
                        .await
                        .unwrap_or_else(|err| {
                            Err(ServiceBusError::Protocol(format!(
                                "the consumer task failed: {err}"
                            )))
                        })
                }),
                Err(err) => Err(ServiceBusError::Protocol(format!(
                    "cannot start the consumer's runtime: {err}"
                ))),
            };
            // Before the result: the caller's next lines must come after this thread's.
            telemetry::flush_this_thread();
            let _ = done.send(result);
        })
        .map_err(|err| ServiceBusError::Protocol(format!("cannot start the consumer: {err}")))?;
    tokio::pin!(shutdown);
    tokio::pin!(finished);
    let result = tokio::select! {
        result = &mut finished => result,
        () = &mut shutdown => {
            let _ = stop.send(());
            finished.await
        }
    };
    result.unwrap_or_else(|_| {
        Err(ServiceBusError::Protocol(
            "the consumer thread stopped unexpectedly".into(),
        ))
    })
}

async fn consume(
    config: &ConsumerConfig,
    common: &CommonConfig,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, ServiceBusError> {
    let mut consumer = Consumer {
        config,
        common,
        credentials,
        metrics,
        summary: Summary {
            completed: 0,
            dead_lettered: 0,
            abandoned: 0,
            stop: StopReason::Done,
        },
        unfinished: Vec::new(),
        losses: LossStreak::default(),
    };
    tokio::pin!(shutdown);
    let mut receiver = tokio::select! {
        opened = consumer.open() => opened?,
        () = &mut shutdown => {
            consumer.summary.stop = StopReason::Signal;
            return Ok(consumer.summary);
        }
    };
    readiness.set_ready(true);
    let stop = consumer.receive_loop(&mut receiver, &mut shutdown).await;
    readiness.set_ready(false);
    let stop = match stop {
        Ok(stop) => stop,
        Err(err) => {
            receiver.close().await;
            return Err(err);
        }
    };
    consumer.summary.stop = stop;
    consumer.release_prefetched(&mut receiver).await;
    receiver.close().await;
    let summary = consumer.summary;
    tracing::info!(
        completed = summary.completed,
        dead_lettered = summary.dead_lettered,
        abandoned = summary.abandoned,
        reason = ?summary.stop,
        "consumer finished"
    );
    Ok(summary)
}

impl Consumer<'_> {
    fn finished(&self) -> u64 {
        self.summary.completed + self.summary.dead_lettered
    }

    fn still_wanted(&self) -> Option<u64> {
        (self.config.message_count > 0)
            .then(|| self.config.message_count.saturating_sub(self.finished()))
    }

    async fn open(&self) -> Result<QueueReceiver, ServiceBusError> {
        retry("connect", &self.common.retry, |attempt| {
            if attempt > 0 {
                self.metrics.reconnect();
            }
            QueueReceiver::open(
                &self.common.namespace,
                self.credentials.clone(),
                &self.config.queue,
                self.common.operation_timeout,
            )
        })
        .await
    }

    async fn reconnect(
        &self,
        receiver: &mut QueueReceiver,
        cause: &ServiceBusError,
    ) -> Result<(), ServiceBusError> {
        let losses = self.losses.lost();
        if losses > self.common.retry.max_attempts + 1 {
            return Err(ServiceBusError::Protocol(format!(
                "{cause}; gave up after {losses} lost connections with no message in between"
            )));
        }
        tracing::warn!(error = %cause, "connection lost; reconnecting");
        self.metrics.reconnect();
        if losses > 1 {
            tokio::time::sleep(backoff_delay(&self.common.retry, losses - 1)).await;
        }
        let fresh = self.open().await?;
        self.losses.reconnected();
        let old = std::mem::replace(receiver, fresh);
        old.close().await;
        Ok(())
    }

    /// Reconnect, unless a stop is requested meanwhile (then true: retries can take longer
    /// than the pod's grace period, and there is nothing to hand back on a lost link).
    async fn reconnect_unless_stopped(
        &self,
        receiver: &mut QueueReceiver,
        cause: &ServiceBusError,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, ServiceBusError> {
        tokio::select! {
            reconnected = self.reconnect(receiver, cause) => reconnected.map(|()| false),
            () = shutdown.as_mut() => {
                tracing::info!("stop requested while reconnecting");
                Ok(true)
            }
        }
    }

    async fn receive_loop(
        &mut self,
        receiver: &mut QueueReceiver,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<StopReason, ServiceBusError> {
        let mut last_message = Instant::now();
        loop {
            let still_wanted = self.still_wanted();
            if still_wanted == Some(0) {
                return Ok(StopReason::Done);
            }
            let credit = desired_credit(self.config.prefetch, still_wanted);
            if needs_credit(receiver.credit(), credit) {
                if let Err(err) = receiver.set_credit(credit).await {
                    if self
                        .reconnect_unless_stopped(receiver, &err, shutdown)
                        .await?
                    {
                        return Ok(StopReason::Signal);
                    }
                    continue;
                }
            }
            let wait = match self.config.idle_timeout {
                Some(idle) => {
                    let left = idle.saturating_sub(last_message.elapsed());
                    if left.is_zero() {
                        tracing::info!(
                            idle_timeout = %humantime::format_duration(idle),
                            "no message within the idle timeout; exiting"
                        );
                        return Ok(StopReason::Idle);
                    }
                    left
                }
                None => CONTINUOUS_WAIT,
            };
            let received = tokio::select! {
                () = shutdown.as_mut() => {
                    tracing::info!("stop requested; taking no more messages");
                    return Ok(StopReason::Signal);
                }
                received = receiver.receive(wait) => received,
            };
            match received {
                Ok(Some(message)) => {
                    last_message = Instant::now();
                    self.losses.progressed();
                    // One span per message: with OTLP export each becomes a trace.
                    let span = tracing::info_span!(
                        "process message",
                        queue = self.config.queue.as_str(),
                        message_id = message.message_id.as_deref().unwrap_or(""),
                        delivery_count = message.delivery_count,
                    );
                    if let Some(traceparent) = &message.trace_context {
                        continue_trace(&span, traceparent);
                    }
                    let stopped = self
                        .handle(receiver, message, shutdown)
                        .instrument(span)
                        .await?;
                    if stopped {
                        return Ok(StopReason::Signal);
                    }
                }
                Ok(None) => {}
                Err(err) if err.is_transient() => {
                    if self
                        .reconnect_unless_stopped(receiver, &err, shutdown)
                        .await?
                    {
                        return Ok(StopReason::Signal);
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Process and settle one message. Returns true when a stop was requested meanwhile.
    async fn handle(
        &mut self,
        receiver: &mut QueueReceiver,
        mut message: ReceivedMessage,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, ServiceBusError> {
        let queue = self.config.queue.as_str();
        self.metrics.message_received(queue, 1);
        let started = Instant::now();
        let text = match message.body.as_text() {
            Ok(text) => text.to_string(),
            Err(reason) => {
                tracing::warn!(message_id = message.message_id.as_deref().unwrap_or(""), %reason, "undecodable message");
                let settlement = Settlement::dead_letter("UndecodableBody", &reason);
                return self.settle(receiver, &message, settlement, shutdown).await;
            }
        };
        tracing::info!(
            message_id = message.message_id.as_deref().unwrap_or(""),
            delivery_count = message.delivery_count,
            "Received message: {}",
            LoggedBody(text.trim_end())
        );
        let processed = tokio::select! {
            () = shutdown.as_mut() => None,
            processed = self.process(receiver, &mut message, &text) => Some(processed),
        };
        self.metrics.observe_processing(queue, started.elapsed());
        match processed {
            None => {
                tracing::info!(
                    message_id = message.message_id.as_deref().unwrap_or(""),
                    "stop requested during processing"
                );
                // Abandoned with the prefetched ones once the flow has stopped, so the broker
                // cannot hand it straight back to this link.
                self.unfinished.push(message);
                Ok(true)
            }
            Some(Ok(())) => {
                let settlement = Settlement::plain(Disposition::Completed);
                self.settle(receiver, &message, settlement, shutdown).await
            }
            Some(Err(reason)) => {
                let attempts = message.delivery_count;
                let max = self.config.max_processing_attempts;
                if attempts >= max {
                    tracing::warn!(message_id = message.message_id.as_deref().unwrap_or(""), attempts, %reason,
                        "processing failed on the last attempt; dead-lettering");
                    let description = format!("{reason} (attempt {attempts} of {max})");
                    let settlement = Settlement::dead_letter("ProcessingFailed", &description);
                    self.settle(receiver, &message, settlement, shutdown).await
                } else {
                    tracing::warn!(message_id = message.message_id.as_deref().unwrap_or(""), attempts, %reason,
                        "processing failed; abandoning for another attempt");
                    let settlement = Settlement::plain(Disposition::Abandoned);
                    self.settle(receiver, &message, settlement, shutdown).await
                }
            }
        }
    }

    /// The work: PROCESSING_DELAY, renewing the lock when the work outlasts it.
    async fn process(
        &self,
        receiver: &mut QueueReceiver,
        message: &mut ReceivedMessage,
        text: &str,
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.config.processing_delay;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let work_left = deadline - now;
            match message.locked_until.and_then(renew_in) {
                Some(renew) if renew < work_left => {
                    tokio::time::sleep(renew).await;
                    match receiver.renew_lock(message).await {
                        Ok(until) => {
                            tracing::debug!(
                                message_id = message.message_id.as_deref().unwrap_or(""),
                                "lock renewed"
                            );
                            message.locked_until = Some(until);
                        }
                        Err(err) => {
                            // Keep working and retry before the lock runs out; if it is
                            // really gone the message comes back to someone.
                            tracing::warn!(message_id = message.message_id.as_deref().unwrap_or(""), error = %err, "lock renewal failed");
                        }
                    }
                }
                _ => tokio::time::sleep(work_left).await,
            }
        }
        match &self.config.processing_fail_match {
            Some(pattern) if text.contains(pattern.as_str()) => {
                Err(format!("body matches PROCESSING_FAIL_MATCH {pattern:?}"))
            }
            _ => Ok(()),
        }
    }

    /// Settle one message. Returns true when a stop was requested while reconnecting after
    /// a failed settlement.
    async fn settle(
        &mut self,
        receiver: &mut QueueReceiver,
        message: &ReceivedMessage,
        settlement: Settlement<'_>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, ServiceBusError> {
        let Settlement {
            disposition,
            reason,
            description,
        } = settlement;
        // Settling on an expired lock has no effect on the broker, and fe2o3 would not tell
        // us: say so instead of counting the message as done.
        if message
            .locked_until
            .is_some_and(|until| until <= SystemTime::now())
        {
            tracing::warn!(
                message_id = message.message_id.as_deref().unwrap_or(""),
                "the lock expired before settlement; Service Bus delivers the message again"
            );
            return Ok(false);
        }
        let started = Instant::now();
        let settled = match disposition {
            Disposition::Completed => receiver.complete(message).await,
            Disposition::Abandoned => receiver.abandon(message).await,
            Disposition::DeadLettered => receiver.dead_letter(message, reason, description).await,
        };
        if let Err(err) = settled {
            // The lock belongs to the lost link; the message returns after its lock expires.
            if err.is_transient() {
                return self
                    .reconnect_unless_stopped(receiver, &err, shutdown)
                    .await;
            }
            return Err(err);
        }
        self.record(disposition, started);
        Ok(false)
    }

    /// Count a settlement in the summary and the metrics.
    fn record(&mut self, disposition: Disposition, started: Instant) {
        let queue = self.config.queue.as_str();
        self.metrics.observe_settle(queue, started.elapsed());
        let outcome = match disposition {
            Disposition::Completed => {
                self.summary.completed += 1;
                SettleOutcome::Completed
            }
            Disposition::DeadLettered => {
                self.summary.dead_lettered += 1;
                SettleOutcome::DeadLettered
            }
            Disposition::Abandoned => {
                self.summary.abandoned += 1;
                SettleOutcome::Abandoned
            }
        };
        self.metrics.message_settled(queue, outcome);
        // Marks the moment a message is done (cold-start and latency measurements read it).
        tracing::debug!(?disposition, "message settled");
    }

    /// Give back the unfinished message and whatever was prefetched.
    ///
    /// Order matters: first take in everything the broker already sent (credit is not
    /// renewed, so this ends), then withdraw the remaining credit, then abandon. Withdrawing
    /// first would make fe2o3 refuse the transfers already on their way (beyond credit), and
    /// abandoning first would let the broker hand the messages straight back to this link.
    async fn release_prefetched(&mut self, receiver: &mut QueueReceiver) {
        // Local credit counts what the broker may still send plus what is buffered here.
        while receiver.credit() > 0 {
            match receiver.receive(DRAIN_WAIT).await {
                Ok(Some(message)) => self.unfinished.push(message),
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!(error = %err, "drain stopped");
                    break;
                }
            }
        }
        if let Err(err) = receiver.set_credit(0).await {
            tracing::debug!(error = %err, "could not withdraw credit");
        }
        for message in std::mem::take(&mut self.unfinished) {
            tracing::info!(
                message_id = message.message_id.as_deref().unwrap_or(""),
                "abandoning unprocessed message"
            );
            let started = Instant::now();
            match receiver.abandon(&message).await {
                Ok(()) => self.record(Disposition::Abandoned, started),
                Err(err) => {
                    tracing::warn!(error = %err, "abandon failed; the message returns when its lock expires");
                }
            }
        }
    }
}

/// Whether to send the broker more credit. Topping up only once half of it is used (as
/// fe2o3's automatic mode and Microsoft's SDKs do) saves a flow frame per message: with
/// PREFETCH=100 the consumer sent one after every message. With a credit of 1 (PREFETCH=0)
/// this asks again as soon as the last credit is used, as before.
fn needs_credit(current: u32, desired: u32) -> bool {
    current <= desired / 2
}

/// Longest body text logged in full; a longer one is cut there, with its size. The tutorial's
/// bodies are a few words; logging (and escaping) a 256 KiB body per message would dominate
/// the consumer's CPU time (a quarter of it with 1 KiB bodies, measured with perf).
const MAX_LOGGED_BODY_CHARS: usize = 200;

/// A message body for the log: in full up to MAX_LOGGED_BODY_CHARS, else its start and size.
struct LoggedBody<'a>(&'a str);

impl std::fmt::Display for LoggedBody<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(MAX_LOGGED_BODY_CHARS) {
            None => f.write_str(self.0),
            Some((cut, _)) => write!(f, "{}... ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

/// How long until a lock held until `locked_until` should be renewed (`None` if unknown
/// or already past: renewing would fail anyway).
fn renew_in(locked_until: SystemTime) -> Option<Duration> {
    let remaining = locked_until.duration_since(SystemTime::now()).ok()?;
    // Too late to be worth a round trip.
    if remaining < MIN_RENEW_WINDOW {
        return None;
    }
    let margin = RENEW_MARGIN.min(remaining / 2);
    Some(remaining - margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_count_until_a_message_or_a_stable_connection() {
        let losses = LossStreak::default();
        let start = Instant::now();
        assert_eq!(losses.lost_at(start), 1);
        losses.reconnected();
        assert_eq!(
            losses.lost_at(Instant::now()),
            2,
            "dropped right after reconnecting"
        );
        losses.progressed();
        assert_eq!(
            losses.lost_at(Instant::now()),
            1,
            "a message in between resets"
        );
        losses.reconnected();
        assert_eq!(losses.lost_at(Instant::now()), 2);
        losses.reconnected();
        let later = Instant::now() + STABLE_CONNECTION;
        assert_eq!(
            losses.lost_at(later),
            1,
            "a connection that stayed up resets"
        );
    }

    #[test]
    fn credit_never_exceeds_what_is_still_wanted() {
        assert_eq!(desired_credit(0, Some(10)), 1);
        assert_eq!(desired_credit(20, Some(10)), 10);
        assert_eq!(desired_credit(20, Some(3)), 3);
        assert_eq!(desired_credit(5, Some(10)), 5);
        assert_eq!(desired_credit(0, None), 1);
        assert_eq!(desired_credit(50, None), 50);
    }

    #[test]
    fn credit_is_topped_up_once_half_is_used() {
        // PREFETCH=0: one credit, asked for again as soon as it is used.
        assert!(needs_credit(0, 1));
        assert!(!needs_credit(1, 1));
        assert!(!needs_credit(51, 100));
        assert!(needs_credit(50, 100));
        assert!(needs_credit(0, 100));
        // Fewer messages still wanted than the credit outstanding: no new credit.
        assert!(!needs_credit(10, 10));
        assert!(needs_credit(5, 10));
    }

    #[test]
    fn long_bodies_are_logged_shortened_with_their_size() {
        assert_eq!(LoggedBody("Hello World!").to_string(), "Hello World!");
        let exact = "x".repeat(MAX_LOGGED_BODY_CHARS);
        assert_eq!(LoggedBody(&exact).to_string(), exact);
        let long = "é".repeat(MAX_LOGGED_BODY_CHARS + 1);
        let logged = LoggedBody(&long).to_string();
        assert_eq!(
            logged,
            format!(
                "{}... ({} bytes)",
                "é".repeat(MAX_LOGGED_BODY_CHARS),
                long.len()
            )
        );
    }

    #[test]
    fn renewal_happens_before_the_lock_expires() {
        let in_60s = SystemTime::now() + Duration::from_secs(60);
        let renew = renew_in(in_60s).expect("renewable");
        assert!(renew <= Duration::from_secs(50) && renew >= Duration::from_secs(49));
        let in_4s = SystemTime::now() + Duration::from_secs(4);
        let renew = renew_in(in_4s).expect("renewable");
        assert!(renew <= Duration::from_secs(2));
        assert_eq!(renew_in(SystemTime::now() - Duration::from_secs(1)), None);
    }
}
