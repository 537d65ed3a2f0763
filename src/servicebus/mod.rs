//! Our thin Service Bus client on fe2o3-amqp: connection (amqp/amqps), `$cbs` claims-based
//! authorisation, batched sender, peek-lock receiver, `$management` lock renewal.
//!
//! Errors are classified once, here: transient ones (connection lost, server busy, timeouts)
//! are retried with exponential backoff and jitter by [`retry`]; fatal ones (unauthorized,
//! not found, message too large) are returned at once with a message that says what to fix.

pub mod admin;
pub mod cbs;
mod coalesce;
pub mod connection;
pub mod diagnostics;
mod link_errors;
pub mod management;
pub mod receiver;
pub mod sender;

use std::future::Future;
use std::time::Duration;

use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::primitives::Symbol;
use rand::Rng;

use crate::auth::AuthError;
use crate::config::RetryConfig;

pub use connection::AmqpConnection;
pub use receiver::{QueueReceiver, ReceivedMessage};
pub use sender::{OutgoingMessage, QueueSender};

/// Everything that can go wrong talking to Service Bus.
#[derive(Debug, thiserror::Error)]
pub enum ServiceBusError {
    /// Credentials or role do not allow the operation.
    #[error("unauthorized: {0} (check the identity's role assignment or the SAS key)")]
    Unauthorized(String),
    /// The queue (or namespace path) does not exist.
    #[error("not found: {0} (check AZURE_SERVICEBUS_QUEUE_NAME and the namespace)")]
    NotFound(String),
    /// A single message exceeds what the link accepts.
    #[error("message too large: {0}")]
    MessageTooLarge(String),
    /// The lock of a message expired or was lost; it will be redelivered.
    #[error("message lock lost: {0}")]
    LockLost(String),
    /// The broker asked us to back off.
    #[error("server busy: {0}")]
    ServerBusy(String),
    /// An operation did not complete in time.
    #[error("{operation} timed out after {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
    /// The connection, session or link went away; reconnecting may help.
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// TLS set-up failed (untrusted certificate, wrong host name).
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Anything else the broker or the protocol layer reported.
    #[error("{0}")]
    Protocol(String),
}

impl ServiceBusError {
    /// Whether retrying (after reconnecting) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ServiceBusError::ServerBusy(_)
            | ServiceBusError::Timeout { .. }
            | ServiceBusError::Disconnected(_) => true,
            ServiceBusError::Auth(err) => err.is_transient(),
            ServiceBusError::Unauthorized(_)
            | ServiceBusError::NotFound(_)
            | ServiceBusError::MessageTooLarge(_)
            | ServiceBusError::LockLost(_)
            | ServiceBusError::Tls(_)
            | ServiceBusError::Protocol(_) => false,
        }
    }

    /// Classify an AMQP error condition sent by the broker.
    pub fn from_amqp(context: &str, error: &definitions::Error) -> Self {
        let condition = condition_name(&error.condition);
        let detail = match &error.description {
            Some(description) => format!("{context}: {condition}: {description}"),
            None => format!("{context}: {condition}"),
        };
        match condition.as_str() {
            "amqp:unauthorized-access" => ServiceBusError::Unauthorized(detail),
            "amqp:not-found" | "com.microsoft:entity-disabled" => ServiceBusError::NotFound(detail),
            "amqp:link:message-size-exceeded" => ServiceBusError::MessageTooLarge(detail),
            "com.microsoft:message-lock-lost" => ServiceBusError::LockLost(detail),
            "com.microsoft:server-busy" => ServiceBusError::ServerBusy(detail),
            "com.microsoft:timeout" | "amqp:resource-limit-exceeded" => {
                ServiceBusError::ServerBusy(detail)
            }
            "amqp:internal-error"
            | "amqp:connection:forced"
            | "amqp:connection:framing-error"
            | "amqp:link:detach-forced"
            | "amqp:link:stolen"
            | "com.microsoft:operation-cancelled" => ServiceBusError::Disconnected(detail),
            _ => ServiceBusError::Protocol(detail),
        }
    }

    /// Classify a `$cbs` / `$management` status code.
    pub fn from_status(context: &str, code: u16, description: Option<&str>) -> Self {
        let detail = format!(
            "{context}: status {code}{}",
            description.map(|d| format!(" {d}")).unwrap_or_default()
        );
        match code {
            401 | 403 => ServiceBusError::Unauthorized(detail),
            404 => ServiceBusError::NotFound(detail),
            410 => ServiceBusError::LockLost(detail),
            408 | 500 | 503 => ServiceBusError::ServerBusy(detail),
            _ => ServiceBusError::Protocol(detail),
        }
    }
}

/// The wire name of an AMQP error condition.
pub fn condition_name(condition: &ErrorCondition) -> String {
    let symbol: Symbol = match condition {
        ErrorCondition::AmqpError(e) => e.into(),
        ErrorCondition::ConnectionError(e) => e.into(),
        ErrorCondition::SessionError(e) => e.into(),
        ErrorCondition::LinkError(e) => e.into(),
        ErrorCondition::Custom(symbol) => symbol.clone(),
        #[allow(unreachable_patterns)]
        _ => Symbol::from("unknown"),
    };
    symbol.0
}

/// Run `operation` under `timeout`, turning an elapsed timer into [`ServiceBusError::Timeout`].
pub async fn with_timeout<T, F>(
    operation: &'static str,
    timeout: Duration,
    future: F,
) -> Result<T, ServiceBusError>
where
    F: Future<Output = Result<T, ServiceBusError>>,
{
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => result,
        Err(_) => Err(ServiceBusError::Timeout { operation, timeout }),
    }
}

/// Delay before retry number `attempt` (1-based): exponential, capped, with "equal jitter":
/// half the capped delay is fixed and the other half random, so many clients restarting
/// together do not retry in lockstep, yet no retry comes sooner than half its delay (a
/// broker that refuses or is busy is never hammered in a tight loop).
pub fn backoff_delay(retry: &RetryConfig, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let ceiling = retry
        .base_delay
        .saturating_mul(1u32 << exponent)
        .min(retry.max_delay);
    let half = ceiling / 2;
    let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms)
}

/// Retry `operation` while it fails transiently, up to `retry.max_attempts` retries, waiting
/// [`backoff_delay`] between tries. The operation gets the attempt number (0 first), so it
/// can count reconnects.
pub async fn retry<T, F, Fut>(
    what: &str,
    retry: &RetryConfig,
    mut operation: F,
) -> Result<T, ServiceBusError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, ServiceBusError>>,
{
    match operation(0).await {
        Ok(value) => Ok(value),
        Err(err) => retry_after(what, retry, err, operation).await,
    }
}

/// Like [`retry`], for an operation whose first try already failed with `failed` (made
/// elsewhere, e.g. a send whose answer was awaited later): only the retries run here, with
/// attempt numbers from 1.
pub async fn retry_after<T, F, Fut>(
    what: &str,
    retry: &RetryConfig,
    failed: ServiceBusError,
    mut operation: F,
) -> Result<T, ServiceBusError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, ServiceBusError>>,
{
    let mut err = failed;
    let mut attempt = 0;
    loop {
        if !err.is_transient() || attempt >= retry.max_attempts {
            return Err(err);
        }
        attempt += 1;
        let delay = backoff_delay(retry, attempt);
        tracing::warn!(
            error = %err,
            attempt,
            max_attempts = retry.max_attempts,
            delay_ms = delay.as_millis() as u64,
            "{what} failed transiently; retrying"
        );
        tokio::time::sleep(delay).await;
        match operation(attempt).await {
            Ok(value) => return Ok(value),
            Err(next) => err = next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::definitions::AmqpError;

    fn retry_config() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let config = RetryConfig {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let first = backoff_delay(&config, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = backoff_delay(&config, 9);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[test]
    fn broker_conditions_are_classified() {
        let unauthorized = definitions::Error::new(AmqpError::UnauthorizedAccess, None, None);
        let err = ServiceBusError::from_amqp("attach", &unauthorized);
        assert!(matches!(err, ServiceBusError::Unauthorized(_)));
        assert!(!err.is_transient());
        let busy = definitions::Error::new(
            ErrorCondition::Custom(Symbol::from("com.microsoft:server-busy")),
            Some("slow down".to_string()),
            None,
        );
        let err = ServiceBusError::from_amqp("send", &busy);
        assert!(err.is_transient());
        assert!(err.to_string().contains("slow down"));
        let not_found = definitions::Error::new(AmqpError::NotFound, None, None);
        assert!(matches!(
            ServiceBusError::from_amqp("attach", &not_found),
            ServiceBusError::NotFound(_)
        ));
        assert!(matches!(
            ServiceBusError::from_status("put-token", 401, Some("bad sig")),
            ServiceBusError::Unauthorized(_)
        ));
    }

    #[tokio::test]
    async fn retry_stops_on_fatal_and_after_max_attempts() {
        let mut calls = 0;
        let result: Result<(), _> = retry("op", &retry_config(), |_| {
            calls += 1;
            async { Err(ServiceBusError::Disconnected("gone".into())) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 4, "first try plus three retries");

        let mut calls = 0;
        let result: Result<(), _> = retry("op", &retry_config(), |_| {
            calls += 1;
            async { Err(ServiceBusError::NotFound("q".into())) }
        })
        .await;
        assert!(matches!(result, Err(ServiceBusError::NotFound(_))));
        assert_eq!(calls, 1);

        let result = retry("op", &retry_config(), |attempt| async move {
            if attempt < 2 {
                Err(ServiceBusError::ServerBusy("busy".into()))
            } else {
                Ok(attempt)
            }
        })
        .await;
        assert_eq!(result.ok(), Some(2));
    }

    #[tokio::test]
    async fn retry_after_a_failure_runs_only_the_retries() {
        let mut attempts = Vec::new();
        let result: Result<(), _> = retry_after(
            "op",
            &retry_config(),
            ServiceBusError::Disconnected("gone".into()),
            |attempt| {
                attempts.push(attempt);
                async { Err(ServiceBusError::ServerBusy("busy".into())) }
            },
        )
        .await;
        assert!(matches!(result, Err(ServiceBusError::ServerBusy(_))));
        assert_eq!(
            attempts,
            vec![1, 2, 3],
            "three retries, no repeat of the first try"
        );

        let mut calls = 0;
        let result: Result<(), _> = retry_after(
            "op",
            &retry_config(),
            ServiceBusError::Unauthorized("refused".into()),
            |_| {
                calls += 1;
                async { Ok(()) }
            },
        )
        .await;
        assert!(matches!(result, Err(ServiceBusError::Unauthorized(_))));
        assert_eq!(calls, 0, "a fatal first failure is not retried");

        let result = retry_after(
            "op",
            &retry_config(),
            ServiceBusError::Disconnected("gone".into()),
            |attempt| async move { Ok(attempt) },
        )
        .await;
        assert_eq!(result.ok(), Some(1));
    }
}
