//! Claims-based security: `put-token` on `$cbs` for each entity, refreshed before expiry so
//! long-running consumers keep their links (the broker drops an entity's links once its token
//! lapses).
//!
//! fe2o3's management client does not match answers to requests: after a put-token that
//! failed or timed out, a late answer could be read as the next put-token's. So a `$cbs` link
//! is used only while every exchange on it succeeded; after a failure it is closed and a new
//! one attached before the next put-token. The link lives on a session of its own, so the
//! background refresher can re-attach it without the session the entity links use.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::primitives::Timestamp;
use fe2o3_amqp::Session;
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::error::Error as MgmtError;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{with_timeout, ServiceBusError};
use crate::auth::{refresh_after, AccessToken, Credentials};

/// The `$cbs` node, used as both the request target and the reply address (as Microsoft's
/// Python SDK does).
const CBS_NODE: &str = "$cbs";
/// Delay before retrying a failed refresh (shorter when the current token lapses sooner).
const REFRESH_RETRY: Duration = Duration::from_secs(5);
/// Shortest delay before retrying a failed refresh.
const MIN_REFRESH_RETRY: Duration = Duration::from_millis(250);

/// The `$cbs` session and, while it can be trusted, its request/response link.
struct CbsLink {
    session: SessionHandle<()>,
    /// `None` after a failed exchange: attach a fresh link before the next one.
    client: Option<CbsClient>,
    timeout: Duration,
}

impl CbsLink {
    /// Put one token, re-attaching the link first if the previous exchange failed.
    async fn put_token(
        &mut self,
        audience: &str,
        token: &AccessToken,
    ) -> Result<(), ServiceBusError> {
        let mut client = match self.client.take() {
            Some(client) => client,
            None => {
                tracing::debug!("attaching a new $cbs link after a failed exchange");
                attach_client(&mut self.session, self.timeout).await?
            }
        };
        // The link is out of `self` while the answer is awaited: if this future is dropped
        // (a caller's timeout), the link goes with it and is never reused.
        let put = with_timeout("put-token", self.timeout, async {
            client
                .put_token(audience, cbs_token(token))
                .await
                .map_err(|err| mgmt_error("put-token", err))
        })
        .await;
        match put {
            Ok(()) => {
                self.client = Some(client);
                Ok(())
            }
            Err(err) => {
                // Detach before a new link is attached, so a late answer cannot reach it.
                if tokio::time::timeout(self.timeout, client.close())
                    .await
                    .is_err()
                {
                    tracing::debug!("closing the $cbs link timed out");
                }
                Err(err)
            }
        }
    }
}

async fn attach_client(
    session: &mut SessionHandle<()>,
    timeout: Duration,
) -> Result<CbsClient, ServiceBusError> {
    with_timeout("attach $cbs", timeout, async {
        CbsClient::builder()
            .management_node_address(CBS_NODE)
            .client_node_addr(CBS_NODE)
            .attach(session)
            .await
            .map_err(|err| ServiceBusError::Disconnected(format!("attach $cbs: {err}")))
    })
    .await
}

pub struct Cbs {
    link: Arc<Mutex<CbsLink>>,
    credentials: Arc<Credentials>,
    refreshers: Vec<JoinHandle<()>>,
}

impl Cbs {
    /// Begin the `$cbs` session on `connection` and attach its link; each step bounded by
    /// `timeout`, which also bounds every later put-token.
    pub async fn attach(
        connection: &mut ConnectionHandle<()>,
        credentials: Arc<Credentials>,
        timeout: Duration,
    ) -> Result<Self, ServiceBusError> {
        let mut session = with_timeout("begin $cbs session", timeout, async {
            Session::begin(connection)
                .await
                .map_err(|err| ServiceBusError::Disconnected(format!("begin $cbs session: {err}")))
        })
        .await?;
        let client = attach_client(&mut session, timeout).await?;
        Ok(Self {
            link: Arc::new(Mutex::new(CbsLink {
                session,
                client: Some(client),
                timeout,
            })),
            credentials,
            refreshers: Vec::new(),
        })
    }

    /// Put a token for `audience` now, and keep refreshing it in the background.
    pub async fn authorize(
        &mut self,
        audience: &str,
        timeout: Duration,
    ) -> Result<(), ServiceBusError> {
        let token = with_timeout("get token", timeout, async {
            self.credentials
                .token(audience)
                .await
                .map_err(ServiceBusError::from)
        })
        .await?;
        self.link.lock().await.put_token(audience, &token).await?;
        tracing::debug!(
            audience,
            expires_in_s = token.remaining().as_secs(),
            "token accepted"
        );
        let refresher = tokio::spawn(refresh_loop(
            self.link.clone(),
            self.credentials.clone(),
            audience.to_string(),
            token.remaining(),
            timeout,
        ));
        self.refreshers.push(refresher);
        Ok(())
    }

    /// Stop refreshing (the connection is closing).
    pub fn stop(&mut self) {
        for refresher in self.refreshers.drain(..) {
            refresher.abort();
        }
    }
}

impl Drop for Cbs {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cbs_token(token: &AccessToken) -> CbsToken<'_> {
    let expires_ms = token
        .expires_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    CbsToken::new(
        token.secret(),
        token.cbs_token_type(),
        Some(Timestamp::from_milliseconds(expires_ms)),
    )
}

/// Map an error of a request/response exchange on a management node.
pub fn mgmt_error(context: &str, err: MgmtError) -> ServiceBusError {
    match err {
        MgmtError::Status(status) => ServiceBusError::from_status(
            context,
            status.code.0.get(),
            status.description.as_deref(),
        ),
        MgmtError::Send(send) => ServiceBusError::Disconnected(format!("{context}: {send}")),
        MgmtError::Recv(recv) => ServiceBusError::Disconnected(format!("{context}: {recv}")),
        other => ServiceBusError::Protocol(format!("{context}: {other}")),
    }
}

/// What the refresher does after a failed refresh.
#[derive(Debug, PartialEq, Eq)]
enum AfterFailure {
    /// Try again shortly: the current token is still valid for a while.
    RetryIn(Duration),
    /// Retrying cannot help (refused, expired fixed signature): stop refreshing.
    GiveUp,
}

/// After a failed refresh: retry transient failures in REFRESH_RETRY, or sooner (half of
/// what is left, at least MIN_REFRESH_RETRY) when the current token would lapse first, so a
/// short-lived token is replaced before the broker stops the links. Once it has lapsed there
/// is nothing left to save by hurrying.
fn after_failure(err: &ServiceBusError, current_token_left: Duration) -> AfterFailure {
    if !err.is_transient() {
        return AfterFailure::GiveUp;
    }
    if current_token_left.is_zero() {
        return AfterFailure::RetryIn(REFRESH_RETRY);
    }
    AfterFailure::RetryIn(
        REFRESH_RETRY
            .min(current_token_left / 2)
            .max(MIN_REFRESH_RETRY),
    )
}

async fn refresh_loop(
    link: Arc<Mutex<CbsLink>>,
    credentials: Arc<Credentials>,
    audience: String,
    valid_for: Duration,
    timeout: Duration,
) {
    let mut current_expiry = Instant::now() + valid_for;
    let mut next_refresh = refresh_after(valid_for);
    loop {
        tokio::time::sleep(next_refresh).await;
        let refreshed = refresh(&link, &credentials, &audience, timeout).await;
        match refreshed {
            Ok(token) => {
                let valid_for = token.remaining();
                current_expiry = Instant::now() + valid_for;
                next_refresh = refresh_after(valid_for);
                tracing::debug!(%audience, expires_in_s = valid_for.as_secs(), "token refreshed");
            }
            Err(err) => {
                let left = current_expiry.saturating_duration_since(Instant::now());
                match after_failure(&err, left) {
                    AfterFailure::RetryIn(delay) => {
                        // If the token lapses meanwhile, the broker detaches our links and
                        // the owner's reconnect path takes over.
                        tracing::warn!(%audience, error = %err, retry_in = ?delay,
                            "token refresh failed; retrying");
                        next_refresh = delay;
                    }
                    AfterFailure::GiveUp => {
                        // Once the token lapses the broker detaches the links; the owner's
                        // reconnect then fails on the same error and stops with it.
                        tracing::error!(%audience, error = %err,
                            "token refresh failed permanently; the entity stays authorised only until the current token expires");
                        return;
                    }
                }
            }
        }
    }
}

async fn refresh(
    link: &Mutex<CbsLink>,
    credentials: &Credentials,
    audience: &str,
    timeout: Duration,
) -> Result<AccessToken, ServiceBusError> {
    let token = with_timeout("get token", timeout, async {
        credentials
            .token(audience)
            .await
            .map_err(ServiceBusError::from)
    })
    .await?;
    link.lock().await.put_token(audience, &token).await?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_retries_temporary_failures_and_gives_up_on_the_others() {
        let retried = [
            ServiceBusError::Timeout {
                operation: "put-token",
                timeout: Duration::from_secs(1),
            },
            ServiceBusError::Disconnected("link gone".into()),
            ServiceBusError::from_status("put-token", 503, None),
        ];
        let hour = Duration::from_secs(3600);
        for err in retried {
            assert_eq!(
                after_failure(&err, hour),
                AfterFailure::RetryIn(REFRESH_RETRY),
                "{err}"
            );
        }
        let final_errors = [
            ServiceBusError::from_status("put-token", 401, Some("signature expired")),
            ServiceBusError::from_status("put-token", 404, None),
            ServiceBusError::Protocol("put-token: status 400".into()),
        ];
        for err in final_errors {
            assert_eq!(after_failure(&err, hour), AfterFailure::GiveUp, "{err}");
        }
    }

    #[test]
    fn a_refresh_is_retried_before_a_short_lived_token_lapses() {
        let timed_out = ServiceBusError::Timeout {
            operation: "put-token",
            timeout: Duration::from_secs(1),
        };
        let retry_in = |left_ms| match after_failure(&timed_out, Duration::from_millis(left_ms)) {
            AfterFailure::RetryIn(delay) => delay,
            AfterFailure::GiveUp => panic!("a timeout is retried"),
        };
        assert_eq!(retry_in(60_000), REFRESH_RETRY);
        assert_eq!(retry_in(4_000), Duration::from_secs(2));
        assert_eq!(retry_in(100), MIN_REFRESH_RETRY);
        // Lapsed already: back to the normal pace.
        assert_eq!(retry_in(0), REFRESH_RETRY);
    }
}
