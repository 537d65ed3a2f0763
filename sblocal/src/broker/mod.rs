//! Service Bus semantics over the AMQP engine: queues, peek-lock, `$cbs`, `$management`.
//!
//! The process layer (listeners, HTTP, fault switches) talks to the broker only through [`Broker`].
//!
//! What clients see, as Service Bus does it:
//! - Addresses `<queue>`, `<queue>/$DeadLetterQueue` and `<entity>/$management`, with or without
//!   a `scheme://host:port/` prefix; an unknown entity is refused with `amqp:not-found`.
//! - `$cbs` put-token (`status-code` 202, or 401): links need a live grant for their entity
//!   (send: Send; receive, settle, `$management`: Listen; Manage covers both); when a grant
//!   expires, the entity's send and receive links are detached with `amqp:unauthorized-access`.
//! - Sends: `max-message-size` and `com.microsoft:max-message-batch-size` on the attach; batches
//!   are message-format `0x80013700`; message bytes are kept as sent (only a missing message-id
//!   is filled in); sequence numbers, enqueued time, `x-opt-scheduled-enqueue-time`.
//! - Peek-lock deliveries: the delivery tag is the lock token in the byte order clients read as
//!   a little-endian UUID; `x-opt-sequence-number`, `x-opt-enqueued-time`, `x-opt-locked-until`,
//!   `x-opt-lock-token` annotations and `header.delivery-count`. Every unsettled settlement is
//!   answered with a settled disposition repeating the outcome (`rejected` without the client's
//!   error); a lost lock is answered with `rejected{com.microsoft:message-lock-lost}`.
//! - Outcomes: `accepted` completes, `modified{delivery-failed}` abandons,
//!   `modified{undeliverable-here}` defers, `rejected` dead-letters with `DeadLetterReason` /
//!   `DeadLetterErrorDescription` from the error info, `released` returns without counting.
//! - Locks expire after the queue's lock duration (or on renew-lock they move on); reaching
//!   `MaxDeliveryCount` dead-letters with `MaxDeliveryCountExceeded`; expired messages are
//!   dropped (or dead-lettered when the queue says so). Locks outlive a closed link until they
//!   expire, as a crashed consumer's would.
//! - `$management`: renew-lock, peek-message, receive-by-sequence-number, update-disposition,
//!   schedule-message, cancel-scheduled-message (`statusCode`/`statusDescription`).

pub mod address;
pub mod connection;
pub mod message;
pub mod queue;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::amqp::EngineConfig;
use crate::auth::TokenValidator;
use crate::config::QueueSpec;
use crate::faults::FaultWindow;
use connection::{BrokerConnection, ConnectionControl};
use queue::Queue;

/// How often expired locks and messages are swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Counts for one queue, as Service Bus reports them in `CountDetails`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub spec: QueueSpec,
    /// Available plus locked messages (Service Bus counts locked messages as active).
    pub active_messages: u64,
    pub dead_letter_messages: u64,
    pub scheduled_messages: u64,
    /// Sum of the stored (encoded) message sizes, dead-lettered ones included.
    pub size_in_bytes: u64,
}

/// The in-memory Service Bus namespace.
pub struct Broker {
    /// Queues in configuration order; looked up case-insensitively like Service Bus entities.
    queues: Vec<Arc<Queue>>,
    by_name: HashMap<String, Arc<Queue>>,
    validator: Arc<dyn TokenValidator>,
    connections: Mutex<Vec<Weak<ConnectionControl>>>,
    /// Fault: sends are answered with `com.microsoft:server-busy`.
    server_busy: FaultWindow,
    /// Fault: `$cbs` put-token requests are taken but never answered.
    silent_cbs: FaultWindow,
    sweeper_started: OnceLock<()>,
    engine: EngineConfig,
}

impl Broker {
    pub fn new(queues: Vec<QueueSpec>, validator: Arc<dyn TokenValidator>) -> Arc<Self> {
        let queues: Vec<Arc<Queue>> = queues
            .into_iter()
            .map(|spec| Arc::new(Queue::new(spec)))
            .collect();
        let by_name = queues
            .iter()
            .map(|queue| (queue.spec.name.to_ascii_lowercase(), queue.clone()))
            .collect();
        Arc::new(Self {
            queues,
            by_name,
            validator,
            connections: Mutex::new(Vec::new()),
            server_busy: FaultWindow::default(),
            silent_cbs: FaultWindow::default(),
            sweeper_started: OnceLock::new(),
            engine: EngineConfig::default(),
        })
    }

    /// Serves one client connection (plain TCP or an already-accepted TLS stream) until it closes.
    pub async fn serve_connection<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.start_sweeper();
        let control = Arc::new(ConnectionControl {
            wake: Arc::new(Notify::new()),
            kill: AtomicBool::new(false),
        });
        self.register(&control);
        let handler = BrokerConnection::new(self.clone(), control.clone());
        let result = crate::amqp::serve(stream, handler, control.wake.clone(), &self.engine).await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    fn register(&self, control: &Arc<ConnectionControl>) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|c| c.strong_count() > 0);
        connections.push(Arc::downgrade(control));
    }

    /// Sweeps expired locks and messages in the background for as long as the broker lives.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.set(()).is_err() {
            return;
        }
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                interval.tick().await;
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                let now = SystemTime::now();
                for queue in &broker.queues {
                    queue.sweep(now);
                }
            }
        });
    }

    pub(crate) fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.by_name.get(&name.to_ascii_lowercase()).cloned()
    }

    pub(crate) fn validator(&self) -> &dyn TokenValidator {
        self.validator.as_ref()
    }

    pub(crate) fn is_busy(&self) -> bool {
        self.server_busy.is_open()
    }

    pub(crate) fn cbs_is_silent(&self) -> bool {
        self.silent_cbs.is_open()
    }

    /// Runtime counts for `queue`, or `None` when no such queue exists.
    pub fn queue_stats(&self, queue: &str) -> Option<QueueStats> {
        let queue = self.queue(queue)?;
        let counts = queue.counts();
        Some(QueueStats {
            spec: queue.spec.clone(),
            active_messages: counts.active,
            dead_letter_messages: counts.dead_letter,
            scheduled_messages: counts.scheduled,
            size_in_bytes: counts.size_bytes,
        })
    }

    /// Names of all queues, in configuration order.
    pub fn queue_names(&self) -> Vec<String> {
        self.queues
            .iter()
            .map(|queue| queue.spec.name.clone())
            .collect()
    }

    /// Fault: close every open client connection now (with an AMQP close carrying an error).
    pub fn drop_all_connections(&self) {
        let connections =
            std::mem::take(&mut *self.connections.lock().unwrap_or_else(|p| p.into_inner()));
        for control in connections.iter().filter_map(Weak::upgrade) {
            control.kill.store(true, Ordering::Release);
            control.wake.notify_one();
        }
    }

    /// Fault: answer every send with `com.microsoft:server-busy` for `duration`.
    pub fn server_busy_for(&self, duration: Duration) {
        self.server_busy.open_for(duration);
    }

    /// Fault: leave `$cbs` put-token requests unanswered for `duration`, as a broker that lost
    /// them would; clients time out and must not mistake a later answer for theirs.
    pub fn silent_cbs_for(&self, duration: Duration) {
        self.silent_cbs.open_for(duration);
    }

    /// Fault: expire every message lock now (the messages become available again).
    pub fn expire_all_locks(&self) {
        for queue in &self.queues {
            queue.expire_all_locks();
        }
    }
}
