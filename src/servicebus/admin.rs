//! The Service Bus management (ATOM) endpoint, read-only: a queue's runtime counts.
//!
//! `GET {base}/{queue}?api-version=2021-05` answers an Atom `<entry>` whose
//! `QueueDescription/CountDetails` carries `ActiveMessageCount` (locked messages included),
//! `DeadLetterMessageCount` and friends. Asking for a queue that does not exist is *not* a
//! 404: Service Bus answers 200 with an empty Atom `<feed>`, which we turn into
//! [`AdminError::QueueNotFound`] so a missing queue never reads as an empty one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::StatusCode;
use url::Url;

use crate::telemetry::{Metrics, RequestOutcome};

/// The management API version Service Bus and its emulator both serve.
pub const API_VERSION: &str = "2021-05";

const ATOM_NS: &str = "http://www.w3.org/2005/Atom";
/// Longest excerpt of an error body kept in an error message.
const MAX_DETAIL_CHARS: usize = 300;
/// A queue description is a few KB; anything far larger is not one (a proxy page, a loop).
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Boxed error from a credential source; its `Display` must not contain secrets.
pub type CredentialError = Box<dyn std::error::Error + Send + Sync>;

/// Produces the `Authorization` header value for a management request.
#[async_trait]
pub trait Authorizer: Send + Sync {
    /// A header value for a request on `resource_uri` (`https://{namespace host}/{queue}`):
    /// `SharedAccessSignature sr=…` signed for that URI, or `Bearer …` for
    /// `https://servicebus.azure.net/.default` (which ignores the URI).
    async fn authorization(&self, resource_uri: &str) -> Result<String, CredentialError>;
}

/// A queue's message counts as the management endpoint reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// `MessageCount`: everything in the queue, dead letters included.
    pub total_messages: u64,
    /// `ActiveMessageCount`: available or locked messages (what KEDA scales on).
    pub active_messages: u64,
    pub dead_letter_messages: u64,
    pub scheduled_messages: u64,
    pub transfer_messages: u64,
    pub transfer_dead_letter_messages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("queue {queue:?} does not exist in the Service Bus namespace")]
    QueueNotFound { queue: String },
    #[error("invalid queue name {queue:?}: {reason}")]
    InvalidQueueName { queue: String, reason: &'static str },
    #[error("management endpoint refused the credentials for {queue:?} (HTTP {status}): {detail}")]
    Unauthorized {
        queue: String,
        status: u16,
        detail: String,
    },
    #[error("management endpoint answered HTTP {status} for {queue:?}: {detail}")]
    Status {
        queue: String,
        status: u16,
        detail: String,
    },
    #[error("management request for {queue:?} failed: {source}")]
    Transport {
        queue: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot get a token for the management endpoint: {0}")]
    Credential(#[source] CredentialError),
    #[error("unexpected management response for {queue:?}: {reason}")]
    InvalidResponse { queue: String, reason: String },
    #[error("cannot build the management HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

impl AdminError {
    /// Whether retrying later may succeed without anyone changing anything: network
    /// trouble, throttling, server errors, a token endpoint hiccup.
    pub fn is_transient(&self) -> bool {
        match self {
            AdminError::Transport { .. } | AdminError::Credential(_) => true,
            AdminError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            AdminError::QueueNotFound { .. }
            | AdminError::InvalidQueueName { .. }
            | AdminError::Unauthorized { .. }
            | AdminError::InvalidResponse { .. }
            | AdminError::Client(_) => false,
        }
    }

    fn outcome(&self) -> RequestOutcome {
        match self {
            AdminError::QueueNotFound { .. } => RequestOutcome::NotFound,
            AdminError::Unauthorized { .. } => RequestOutcome::Unauthorized,
            _ => RequestOutcome::Error,
        }
    }
}

/// Check a queue name before it becomes part of a URL path. Service Bus allows letters,
/// digits, `.`, `-`, `_` and `/` (hierarchical names), at most 260 characters.
pub fn validate_queue_name(queue: &str) -> Result<(), AdminError> {
    let invalid = |reason| AdminError::InvalidQueueName {
        queue: queue.to_owned(),
        reason,
    };
    if queue.is_empty() {
        return Err(invalid("empty"));
    }
    if queue.len() > 260 {
        return Err(invalid("longer than 260 characters"));
    }
    if !queue
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
    {
        return Err(invalid(
            "only letters, digits, '.', '-', '_' and '/' are allowed",
        ));
    }
    if queue
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(invalid("empty, '.' or '..' path segment"));
    }
    Ok(())
}

/// Client for the management endpoint of one namespace.
pub struct AdminClient {
    http: reqwest::Client,
    base: Url,
    namespace_host: String,
    authorizer: Arc<dyn Authorizer>,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base.as_str())
            .field("namespace_host", &self.namespace_host)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// `base` is the management endpoint (`https://{host}/`, or the emulator's
    /// `http://localhost:5300/`); `namespace_host` the namespace's host name, which
    /// SAS tokens are signed for.
    pub fn new(
        base: Url,
        namespace_host: impl Into<String>,
        authorizer: Arc<dyn Authorizer>,
        metrics: Option<Arc<Metrics>>,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("servicebusdemo/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(AdminError::Client)?;
        Ok(AdminClient {
            http,
            base: with_trailing_slash(base),
            namespace_host: namespace_host.into(),
            authorizer,
            metrics,
        })
    }

    /// The management endpoint this client talks to.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `{base}{queue}?api-version=2021-05`, path segments percent-encoded.
    pub fn queue_url(&self, queue: &str) -> Result<Url, AdminError> {
        validate_queue_name(queue)?;
        let mut url = self.base.clone();
        {
            let mut segments =
                url.path_segments_mut()
                    .map_err(|()| AdminError::InvalidResponse {
                        queue: queue.to_owned(),
                        reason: "management endpoint URL cannot carry a path".to_owned(),
                    })?;
            segments.pop_if_empty();
            segments.extend(queue.split('/'));
        }
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION);
        Ok(url)
    }

    /// The resource URI a SAS token for this queue is signed for.
    pub fn resource_uri(&self, queue: &str) -> String {
        format!("https://{}/{}", self.namespace_host, queue)
    }

    /// Fetch the queue's runtime counts. One HTTP request, counted in
    /// `servicebusdemo_management_requests_total{outcome}`.
    pub async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, AdminError> {
        let result = self.fetch_queue_counts(queue).await;
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok(_) => RequestOutcome::Success,
                Err(err) => err.outcome(),
            };
            metrics.management_request(outcome);
        }
        result
    }

    async fn fetch_queue_counts(&self, queue: &str) -> Result<QueueCounts, AdminError> {
        let url = self.queue_url(queue)?;
        let authorization = self
            .authorizer
            .authorization(&self.resource_uri(queue))
            .await
            .map_err(AdminError::Credential)?;
        let mut header = HeaderValue::from_str(&authorization).map_err(|_| {
            AdminError::Credential("authorization value is not a valid HTTP header".into())
        })?;
        header.set_sensitive(true);

        let transport = |source| AdminError::Transport {
            queue: queue.to_owned(),
            source,
        };
        let response = self
            .http
            .get(url)
            .header(AUTHORIZATION, header)
            .header(ACCEPT, "application/atom+xml, application/xml")
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = read_body(queue, response).await?;
        tracing::debug!(
            queue,
            status = status.as_u16(),
            "management endpoint answered"
        );
        check_status(queue, status, &body)?;
        parse_queue_counts(queue, &body)
    }
}

/// The response body as text, refusing bodies over [`MAX_BODY_BYTES`].
async fn read_body(queue: &str, mut response: reqwest::Response) -> Result<String, AdminError> {
    let too_large = || AdminError::InvalidResponse {
        queue: queue.to_owned(),
        reason: format!("response body larger than {MAX_BODY_BYTES} bytes"),
    };
    if response
        .content_length()
        .is_some_and(|length| length > MAX_BODY_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| AdminError::Transport {
            queue: queue.to_owned(),
            source,
        })?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| AdminError::InvalidResponse {
        queue: queue.to_owned(),
        reason: "response body is not UTF-8".to_owned(),
    })
}

fn with_trailing_slash(mut base: Url) -> Url {
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    base
}

fn check_status(queue: &str, status: StatusCode, body: &str) -> Result<(), AdminError> {
    if status.is_success() {
        return Ok(());
    }
    let detail = error_detail(body);
    Err(match status {
        StatusCode::NOT_FOUND => AdminError::QueueNotFound {
            queue: queue.to_owned(),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => AdminError::Unauthorized {
            queue: queue.to_owned(),
            status: status.as_u16(),
            detail,
        },
        _ => AdminError::Status {
            queue: queue.to_owned(),
            status: status.as_u16(),
            detail,
        },
    })
}

/// The `<Detail>` of a Service Bus `<Error>` body, else the start of the body.
fn error_detail(body: &str) -> String {
    let from_xml = roxmltree::Document::parse(body).ok().and_then(|doc| {
        doc.descendants()
            .find(|node| node.has_tag_name("Detail"))
            .and_then(|node| node.text())
            .map(str::to_owned)
    });
    let detail = from_xml.unwrap_or_else(|| body.trim().to_owned());
    detail.chars().take(MAX_DETAIL_CHARS).collect()
}

/// Parse the answer to `GET {base}/{queue}`: an Atom entry with a `QueueDescription`, or
/// the empty feed Service Bus sends for a queue that does not exist.
pub fn parse_queue_counts(queue: &str, body: &str) -> Result<QueueCounts, AdminError> {
    let invalid = |reason: String| AdminError::InvalidResponse {
        queue: queue.to_owned(),
        reason,
    };
    let doc = roxmltree::Document::parse(body).map_err(|err| invalid(format!("not XML: {err}")))?;
    let root = doc.root_element();
    if root.has_tag_name((ATOM_NS, "feed")) {
        // A feed means "no entity at this path": a listing with no entries.
        return Err(AdminError::QueueNotFound {
            queue: queue.to_owned(),
        });
    }
    if !root.has_tag_name((ATOM_NS, "entry")) {
        return Err(invalid(format!(
            "expected an Atom entry, got <{}>",
            root.tag_name().name()
        )));
    }
    let description = root
        .descendants()
        .find(|node| node.is_element() && node.tag_name().name().ends_with("Description"))
        .ok_or_else(|| invalid("the entry has no entity description".to_owned()))?;
    if description.tag_name().name() != "QueueDescription" {
        return Err(invalid(format!(
            "the entity is a {}, not a queue",
            description.tag_name().name()
        )));
    }
    let count_details = description
        .children()
        .find(|node| node.is_element() && node.tag_name().name() == "CountDetails")
        .ok_or_else(|| invalid("QueueDescription has no CountDetails".to_owned()))?;

    let count = |name: &str, text: &str| -> Result<u64, AdminError> {
        text.trim()
            .parse::<u64>()
            .map_err(|_| invalid(format!("{name} is not a count: {text:?}")))
    };
    let field = |parent: roxmltree::Node<'_, '_>, name: &str| -> Result<u64, AdminError> {
        let text = child_text(parent, name).ok_or_else(|| invalid(format!("{name} is missing")))?;
        count(name, text)
    };
    // Older API versions and some tiers leave these out; absent means none.
    let optional = |parent: roxmltree::Node<'_, '_>, name: &str| -> Result<u64, AdminError> {
        child_text(parent, name).map_or(Ok(0), |text| count(name, text))
    };

    Ok(QueueCounts {
        active_messages: field(count_details, "ActiveMessageCount")?,
        dead_letter_messages: field(count_details, "DeadLetterMessageCount")?,
        scheduled_messages: optional(count_details, "ScheduledMessageCount")?,
        transfer_messages: optional(count_details, "TransferMessageCount")?,
        transfer_dead_letter_messages: optional(count_details, "TransferDeadLetterMessageCount")?,
        total_messages: optional(description, "MessageCount")?,
    })
}

/// The text of `parent`'s first child element called `name`; `None` when there is no such
/// element or it is empty (`<X/>`, `<X i:nil="true"/>`).
fn child_text<'a>(parent: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    parent
        .children()
        .find(|node| node.is_element() && node.tag_name().name() == name)
        .and_then(|node| node.text())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like a real answer from a Standard-tier namespace (values changed).
    const QUEUE_ENTRY: &str = r#"<entry xml:base="https://contoso.servicebus.windows.net/orders?api-version=2021-05" xmlns="http://www.w3.org/2005/Atom"><id>https://contoso.servicebus.windows.net/orders?api-version=2021-05</id><title type="text">orders</title><published>2026-11-20T09:12:31Z</published><updated>2026-11-23T17:40:02Z</updated><author><name>contoso</name></author><link rel="self" href="https://contoso.servicebus.windows.net/orders?api-version=2021-05"/><content type="application/xml"><QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><LockDuration>PT1M</LockDuration><MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>false</RequiresDuplicateDetection><RequiresSession>false</RequiresSession><DefaultMessageTimeToLive>P14D</DefaultMessageTimeToLive><DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration><DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow><MaxDeliveryCount>10</MaxDeliveryCount><EnableBatchedOperations>true</EnableBatchedOperations><SizeInBytes>45731</SizeInBytes><MessageCount>107</MessageCount><IsAnonymousAccessible>false</IsAnonymousAccessible><AuthorizationRules/><Status>Active</Status><ForwardTo i:nil="true"/><CreatedAt>2026-11-20T09:12:31.32Z</CreatedAt><UpdatedAt>2026-11-20T09:12:31.78Z</UpdatedAt><AccessedAt>2026-11-23T17:40:02.113Z</AccessedAt><SupportOrdering>true</SupportOrdering><CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus"><d2p1:ActiveMessageCount>100</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>4</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>3</d2p1:ScheduledMessageCount><d2p1:TransferMessageCount>0</d2p1:TransferMessageCount><d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount></CountDetails><AutoDeleteOnIdle>P10675199DT2H48M5.4775807S</AutoDeleteOnIdle><EnablePartitioning>false</EnablePartitioning><EntityAvailabilityStatus>Available</EntityAvailabilityStatus><EnableExpress>false</EnableExpress></QueueDescription></content></entry>"#;

    /// What Service Bus answers with status 200 for a queue that does not exist.
    const EMPTY_FEED: &str = r#"<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title><subtitle type="text">This is the list of publicly-listed services currently available.</subtitle><id>uuid:6a5d1a3c-5c1e-4f5b-9d1e-0b2c7f0e9a11;id=1</id><updated>2026-11-23T17:40:02Z</updated><generator>Service Bus 1.1</generator></feed>"#;

    #[test]
    fn parses_count_details_of_a_queue_entry() {
        let counts = parse_queue_counts("orders", QUEUE_ENTRY).expect("counts");
        assert_eq!(
            counts,
            QueueCounts {
                total_messages: 107,
                active_messages: 100,
                dead_letter_messages: 4,
                scheduled_messages: 3,
                transfer_messages: 0,
                transfer_dead_letter_messages: 0,
            }
        );
    }

    #[test]
    fn empty_feed_means_the_queue_does_not_exist() {
        let err = parse_queue_counts("nope", EMPTY_FEED).expect_err("missing queue");
        assert!(matches!(err, AdminError::QueueNotFound { ref queue } if queue == "nope"));
        assert!(!err.is_transient());
    }

    #[test]
    fn a_topic_entry_is_not_a_queue() {
        let topic = QUEUE_ENTRY
            .replace("<QueueDescription ", "<TopicDescription ")
            .replace("</QueueDescription>", "</TopicDescription>");
        let err = parse_queue_counts("orders", &topic).expect_err("topic");
        assert!(err.to_string().contains("TopicDescription"), "{err}");
    }

    #[test]
    fn missing_or_garbled_counts_are_errors_not_zeros() {
        let without_active =
            QUEUE_ENTRY.replace("<d2p1:ActiveMessageCount>100</d2p1:ActiveMessageCount>", "");
        let err = parse_queue_counts("orders", &without_active).expect_err("missing");
        assert!(err.to_string().contains("ActiveMessageCount"), "{err}");

        let negative = QUEUE_ENTRY.replace(
            ">100</d2p1:ActiveMessageCount>",
            ">-1</d2p1:ActiveMessageCount>",
        );
        assert!(parse_queue_counts("orders", &negative).is_err());

        assert!(parse_queue_counts("orders", "<html>proxy error</html>").is_err());
        assert!(parse_queue_counts("orders", "not xml at all").is_err());
    }

    #[test]
    fn optional_counts_default_to_zero_only_when_absent() {
        let without_scheduled = QUEUE_ENTRY
            .replace(
                "<d2p1:ScheduledMessageCount>3</d2p1:ScheduledMessageCount>",
                "",
            )
            .replace("<MessageCount>107</MessageCount>", "");
        let counts = parse_queue_counts("orders", &without_scheduled).expect("counts");
        assert_eq!(counts.scheduled_messages, 0);
        assert_eq!(counts.total_messages, 0);
        assert_eq!(counts.active_messages, 100);

        let garbled = QUEUE_ENTRY.replace(
            ">3</d2p1:ScheduledMessageCount>",
            ">three</d2p1:ScheduledMessageCount>",
        );
        let err = parse_queue_counts("orders", &garbled).expect_err("garbled optional count");
        assert!(err.to_string().contains("ScheduledMessageCount"), "{err}");
    }

    #[test]
    fn error_bodies_become_typed_errors() {
        let body = "<Error><Code>401</Code><Detail>InvalidSignature: The token has an invalid signature.</Detail></Error>";
        let err = check_status("orders", StatusCode::UNAUTHORIZED, body).expect_err("401");
        assert!(matches!(err, AdminError::Unauthorized { status: 401, .. }));
        assert!(err.to_string().contains("InvalidSignature"), "{err}");
        assert!(!err.is_transient());

        let busy =
            check_status("orders", StatusCode::SERVICE_UNAVAILABLE, "busy").expect_err("503");
        assert!(busy.is_transient());
        let throttled = check_status("orders", StatusCode::TOO_MANY_REQUESTS, "").expect_err("429");
        assert!(throttled.is_transient());
        let missing = check_status("orders", StatusCode::NOT_FOUND, "").expect_err("404");
        assert!(matches!(missing, AdminError::QueueNotFound { .. }));
    }

    #[test]
    fn queue_names_are_checked_before_they_reach_a_url() {
        for good in ["orders", "a.b-c_d", "team/orders"] {
            assert!(validate_queue_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "../admin", "a//b", "q?x=1", "q#frag", "é"] {
            assert!(validate_queue_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_queue_name(&"q".repeat(261)).is_err());
    }

    struct NoAuth;

    #[async_trait]
    impl Authorizer for NoAuth {
        async fn authorization(&self, _resource_uri: &str) -> Result<String, CredentialError> {
            Ok("Bearer test".to_owned())
        }
    }

    #[test]
    fn queue_url_keeps_the_base_path_and_adds_the_api_version() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = Url::parse("http://127.0.0.1:5300/prefix").expect("url");
        let client = AdminClient::new(
            base,
            "contoso.servicebus.windows.net",
            Arc::new(NoAuth),
            None,
            Duration::from_secs(5),
        )
        .expect("client");
        assert_eq!(
            client.queue_url("team/orders").expect("url").as_str(),
            "http://127.0.0.1:5300/prefix/team/orders?api-version=2021-05"
        );
        assert_eq!(
            client.resource_uri("orders"),
            "https://contoso.servicebus.windows.net/orders"
        );
    }
}
