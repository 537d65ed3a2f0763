//! Claims-based security: `put-token` on `$cbs` for each entity, refreshed before expiry so
//! long-running consumers keep their links (the broker stops deliveries once a token lapses).

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::primitives::Timestamp;
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::error::Error as MgmtError;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::{with_timeout, ServiceBusError};
use crate::auth::{refresh_after, AccessToken, Credentials};

/// The `$cbs` node, used as both the request target and the reply address (as Microsoft's
/// Python SDK does).
const CBS_NODE: &str = "$cbs";
/// Delay before retrying a failed refresh.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

pub struct Cbs {
    client: Arc<Mutex<CbsClient>>,
    credentials: Arc<Credentials>,
    refreshers: Vec<JoinHandle<()>>,
}

impl Cbs {
    pub async fn attach(
        session: &mut SessionHandle<()>,
        credentials: Arc<Credentials>,
    ) -> Result<Self, ServiceBusError> {
        let client = CbsClient::builder()
            .management_node_address(CBS_NODE)
            .client_node_addr(CBS_NODE)
            .attach(session)
            .await
            .map_err(|err| ServiceBusError::Disconnected(format!("attach $cbs: {err}")))?;
        Ok(Self {
            client: Arc::new(Mutex::new(client)),
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
        with_timeout(
            "put-token",
            timeout,
            put_token(&self.client, audience, &token),
        )
        .await?;
        tracing::debug!(
            audience,
            expires_in_s = token.remaining().as_secs(),
            "token accepted"
        );
        let refresher = tokio::spawn(refresh_loop(
            self.client.clone(),
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

async fn put_token(
    client: &Mutex<CbsClient>,
    audience: &str,
    token: &AccessToken,
) -> Result<(), ServiceBusError> {
    let expires_ms = token
        .expires_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let cbs_token = CbsToken::new(
        token.secret(),
        token.cbs_token_type(),
        Some(Timestamp::from_milliseconds(expires_ms)),
    );
    let mut client = client.lock().await;
    client
        .put_token(audience, cbs_token)
        .await
        .map_err(|err| mgmt_error("put-token", err))
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

async fn refresh_loop(
    client: Arc<Mutex<CbsClient>>,
    credentials: Arc<Credentials>,
    audience: String,
    mut valid_for: Duration,
    timeout: Duration,
) {
    loop {
        tokio::time::sleep(refresh_after(valid_for)).await;
        let refreshed = with_timeout("refresh token", timeout, async {
            let token = credentials.token(&audience).await?;
            put_token(&client, &audience, &token).await?;
            Ok::<_, ServiceBusError>(token)
        })
        .await;
        match refreshed {
            Ok(token) => {
                valid_for = token.remaining();
                tracing::debug!(%audience, expires_in_s = valid_for.as_secs(), "token refreshed");
            }
            Err(err) => {
                // The current token is still valid for a while; try again soon. If it lapses
                // the broker detaches our links and the caller's reconnect path takes over.
                tracing::warn!(%audience, error = %err, "token refresh failed; retrying");
                valid_for = REFRESH_RETRY * 4 / 3;
            }
        }
    }
}
