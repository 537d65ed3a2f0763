//! The Service Bus management (ATOM) endpoint, read side: `GET /<queue>?api-version=…` returns the
//! queue's Atom `<entry>` with its `QueueDescription` and `CountDetails`, as the real service and
//! the emulator (port 5300) do. A missing queue is answered as Service Bus answers it: 200 with an
//! empty feed (clients turn that into "not found").
//!
//! Authorisation: an `Authorization` header with a SAS token carrying Manage, or a bearer access
//! token of an identity with the Data Owner role.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::auth::{AuthError, TokenValidator};
use crate::broker::{Broker, QueueStats};
use crate::faults::Counters;

const ATOM_CONTENT_TYPE: &str = "application/atom+xml;type=entry;charset=utf-8";
const FEED_CONTENT_TYPE: &str = "application/atom+xml;type=feed;charset=utf-8";
const XML_CONTENT_TYPE: &str = "application/xml; charset=utf-8";
/// `TimeSpan.MaxValue`, what Service Bus reports for settings that never expire.
const TIMESPAN_MAX: &str = "P10675199DT2H48M5.4775807S";

pub struct AtomState {
    pub broker: Arc<Broker>,
    pub validator: Arc<dyn TokenValidator>,
    pub counters: Arc<Counters>,
    /// When the process started: the entities' CreatedAt/UpdatedAt.
    pub started_at: SystemTime,
}

pub fn routes(state: Arc<AtomState>) -> Router {
    Router::new()
        .route("/{entity}", get(get_entity))
        .with_state(state)
}

async fn get_entity(
    State(state): State<Arc<AtomState>>,
    Path(entity): Path<String>,
    headers: HeaderMap,
) -> Response {
    Counters::bump(&state.counters.atom_requests);
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    if let Err(denied) = authorize(&state, &headers, &entity) {
        return denied.into_response();
    }
    match state.broker.queue_stats(&entity) {
        Some(stats) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, ATOM_CONTENT_TYPE)],
            queue_entry(&host, &stats, state.started_at),
        )
            .into_response(),
        None => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, FEED_CONTENT_TYPE)],
            empty_feed(&host, &entity),
        )
            .into_response(),
    }
}

/// A refused request: always 401 with Service Bus's XML error body.
struct Denied(String);

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        error_response(StatusCode::UNAUTHORIZED, &self.0)
    }
}

fn authorize(state: &AtomState, headers: &HeaderMap, entity: &str) -> Result<(), Denied> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Denied("MissingToken: The authorization header was not found.".into()))?;
    let token = token.strip_prefix("Bearer ").unwrap_or(token);
    match state.validator.validate(token, entity) {
        Ok(grant) if grant.rights.manage => Ok(()),
        Ok(grant) => {
            tracing::info!(subject = %grant.subject, entity, "ATOM request without Manage");
            Err(Denied(
                "Unauthorized access. 'Manage,EntityRead' claim(s) are required to perform this operation."
                    .into(),
            ))
        }
        Err(error) => {
            let detail = match error {
                AuthError::Expired => "ExpiredToken: The token is expired.".to_string(),
                other => format!("InvalidSignature: The token is not valid: {other}."),
            };
            Err(Denied(detail))
        }
    }
}

/// Service Bus's XML error body (`<Error><Code/><Detail/></Error>`).
fn error_response(status: StatusCode, detail: &str) -> Response {
    let body = format!(
        "<Error><Code>{}</Code><Detail>{}</Detail></Error>",
        status.as_u16(),
        escape(detail)
    );
    (status, [(header::CONTENT_TYPE, XML_CONTENT_TYPE)], body).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// A duration in the `XmlConvert` style Service Bus writes (`PT1M`, `P1DT2H`, `PT0.5S`).
pub fn xml_duration(duration: Duration) -> String {
    let total = duration.as_secs();
    let (days, rest) = (total / 86_400, total % 86_400);
    let (hours, minutes, seconds) = (rest / 3600, rest % 3600 / 60, rest % 60);
    let millis = duration.subsec_millis();
    let mut out = String::from("P");
    if days > 0 {
        out.push_str(&format!("{days}D"));
    }
    if hours > 0 || minutes > 0 || seconds > 0 || millis > 0 || days == 0 {
        out.push('T');
        if hours > 0 {
            out.push_str(&format!("{hours}H"));
        }
        if minutes > 0 {
            out.push_str(&format!("{minutes}M"));
        }
        if millis > 0 {
            out.push_str(&format!("{seconds}.{millis:03}S"));
        } else if seconds > 0 || (hours == 0 && minutes == 0) {
            out.push_str(&format!("{seconds}S"));
        }
    }
    out
}

/// The Atom entry for one queue.
pub fn queue_entry(host: &str, stats: &QueueStats, started_at: SystemTime) -> String {
    let name = escape(&stats.spec.name);
    let host = escape(host);
    let created = timestamp(started_at);
    let now = timestamp(SystemTime::now());
    let spec = &stats.spec;
    format!(
        r#"<entry xml:base="https://{host}/{name}?api-version=2021-05" xmlns="http://www.w3.org/2005/Atom"><id>https://{host}/{name}?api-version=2021-05</id><title type="text">{name}</title><published>{created}</published><updated>{created}</updated><author><name>sblocal</name></author><link rel="self" href="../{name}?api-version=2021-05"/><content type="application/xml"><QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><LockDuration>{lock}</LockDuration><MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><RequiresSession>false</RequiresSession><DefaultMessageTimeToLive>{ttl}</DefaultMessageTimeToLive><DeadLetteringOnMessageExpiration>{dlq_on_expiry}</DeadLetteringOnMessageExpiration><DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow><MaxDeliveryCount>{max_delivery}</MaxDeliveryCount><EnableBatchedOperations>true</EnableBatchedOperations><SizeInBytes>{size}</SizeInBytes><MessageCount>{message_count}</MessageCount><IsAnonymousAccessible>false</IsAnonymousAccessible><AuthorizationRules/><Status>Active</Status><ForwardTo/><CreatedAt>{created}</CreatedAt><UpdatedAt>{created}</UpdatedAt><AccessedAt>{now}</AccessedAt><SupportOrdering>true</SupportOrdering><CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus"><d2p1:ActiveMessageCount>{active}</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>{dead}</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>{scheduled}</d2p1:ScheduledMessageCount><d2p1:TransferMessageCount>0</d2p1:TransferMessageCount><d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount></CountDetails><AutoDeleteOnIdle>{never}</AutoDeleteOnIdle><EnablePartitioning>false</EnablePartitioning><EntityAvailabilityStatus>Available</EntityAvailabilityStatus><ForwardDeadLetteredMessagesTo/><EnableExpress>false</EnableExpress><MaxMessageSizeInKilobytes>256</MaxMessageSizeInKilobytes></QueueDescription></content></entry>"#,
        lock = xml_duration(spec.lock_duration),
        ttl = xml_duration(spec.default_message_ttl),
        dlq_on_expiry = spec.dead_lettering_on_message_expiration,
        max_delivery = spec.max_delivery_count,
        size = stats.size_in_bytes,
        message_count =
            stats.active_messages + stats.dead_letter_messages + stats.scheduled_messages,
        active = stats.active_messages,
        dead = stats.dead_letter_messages,
        scheduled = stats.scheduled_messages,
        never = TIMESPAN_MAX,
    )
}

/// What Service Bus answers for an entity that does not exist.
pub fn empty_feed(host: &str, entity: &str) -> String {
    let host = escape(host);
    let entity = escape(entity);
    let now = timestamp(SystemTime::now());
    format!(
        r#"<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title><id>uuid:{id};id=1</id><updated>{now}</updated><link rel="self" href="https://{host}/{entity}?api-version=2021-05"/></feed>"#,
        id = uuid::Uuid::new_v4()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueSpec;

    #[test]
    fn durations_are_written_like_xmlconvert() {
        assert_eq!(xml_duration(Duration::from_secs(60)), "PT1M");
        assert_eq!(xml_duration(Duration::from_secs(3600)), "PT1H");
        assert_eq!(xml_duration(Duration::from_secs(86_400)), "P1D");
        assert_eq!(xml_duration(Duration::from_secs(93_784)), "P1DT2H3M4S");
        assert_eq!(xml_duration(Duration::from_millis(1500)), "PT1.500S");
        assert_eq!(xml_duration(Duration::ZERO), "PT0S");
        for secs in [1, 59, 61, 3599, 3601, 86_399, 90_061] {
            let text = xml_duration(Duration::from_secs(secs));
            assert_eq!(
                crate::config::parse_iso8601_duration(&text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
    }

    #[test]
    fn entry_carries_counts_and_settings() {
        let stats = QueueStats {
            spec: QueueSpec::with_defaults("queue.1"),
            active_messages: 7,
            dead_letter_messages: 2,
            scheduled_messages: 1,
            size_in_bytes: 4096,
        };
        let xml = queue_entry("localhost:5300", &stats, SystemTime::now());
        assert!(xml.contains("<d2p1:ActiveMessageCount>7</d2p1:ActiveMessageCount>"));
        assert!(xml.contains("<d2p1:DeadLetterMessageCount>2</d2p1:DeadLetterMessageCount>"));
        assert!(xml.contains("<d2p1:ScheduledMessageCount>1</d2p1:ScheduledMessageCount>"));
        assert!(xml.contains("<MessageCount>10</MessageCount>"));
        assert!(xml.contains("<SizeInBytes>4096</SizeInBytes>"));
        assert!(xml.contains("<LockDuration>PT1M</LockDuration>"));
        assert!(xml.contains("<MaxDeliveryCount>3</MaxDeliveryCount>"));
    }

    #[test]
    fn names_are_escaped() {
        let feed = empty_feed("h", "a<b");
        assert!(feed.contains("a&lt;b") && !feed.contains("a<b"));
    }
}
