//! Service Bus semantics over the AMQP engine: queues, peek-lock, `$cbs`, `$management`.
//!
//! The process layer (listeners, HTTP, fault switches) talks to the broker only through [`Broker`].

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::TokenValidator;
use crate::config::QueueSpec;

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
    queues: Vec<QueueSpec>,
    _validator: Arc<dyn TokenValidator>,
}

impl Broker {
    pub fn new(queues: Vec<QueueSpec>, validator: Arc<dyn TokenValidator>) -> Arc<Self> {
        Arc::new(Self {
            queues,
            _validator: validator,
        })
    }

    /// Serves one client connection (plain TCP or an already-accepted TLS stream) until it closes.
    pub async fn serve_connection<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        drop(stream);
    }

    /// Runtime counts for `queue`, or `None` when no such queue exists.
    pub fn queue_stats(&self, queue: &str) -> Option<QueueStats> {
        self.queues
            .iter()
            .find(|spec| spec.name == queue)
            .map(|spec| QueueStats {
                spec: spec.clone(),
                active_messages: 0,
                dead_letter_messages: 0,
                scheduled_messages: 0,
                size_in_bytes: 0,
            })
    }

    /// Names of all queues, in configuration order.
    pub fn queue_names(&self) -> Vec<String> {
        self.queues.iter().map(|spec| spec.name.clone()).collect()
    }

    /// Fault: close every open client connection now (with an AMQP close carrying an error).
    pub fn drop_all_connections(&self) {}

    /// Fault: answer every send with `com.microsoft:server-busy` for `duration`.
    pub fn server_busy_for(&self, _duration: Duration) {}

    /// Fault: expire every message lock now (the messages become available again).
    pub fn expire_all_locks(&self) {}
}
