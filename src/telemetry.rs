//! Observability for every mode: `tracing` logs (text or JSON), optional OTLP trace export,
//! one prometheus-client registry, and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.
//!
//! Metric names follow the Prometheus conventions and keep label sets bounded: `queue`,
//! `mode` and `outcome` only, never message ids.
//!
//! Use: `init_tracing(&TracingConfig { .. })` once (keep the guard: dropping it flushes
//! spans), `Arc::new(Metrics::new(mode))` shared by everything that records
//! (`metrics.message_sent(queue, n)`, `observe_send(queue, elapsed)`, ...), and
//! `serve_http(addr, metrics, readiness)` for `/metrics`, `/healthz` and `/readyz`.

mod log_writer;

pub use log_writer::{buffer_this_thread, flush_this_thread};

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{global, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// The OpenMetrics text exposition content type, served when the scraper asks for it
/// (Prometheus does).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, served to everyone else (curl, `promtool check metrics`).
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors from setting up telemetry. Everything here happens once at start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter (RUST_LOG) {filter:?}: {source}")]
    LogFilter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed: {0}")]
    SubscriberInstalled(#[from] tracing_subscriber::util::TryInitError),
    #[error("cannot build the OTLP span exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot bind the metrics/health server on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// An error and its causes as one log line, each message once: our errors often show their
/// source in their own text.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        let text = one_line(&err.to_string());
        if !text.is_empty() && !parts.iter().any(|seen| seen.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// All non-empty lines of `text`, trimmed and joined with spaces: identity-library errors span
/// several lines, and a log field or status message must be one.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// How a received message was settled.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SettleOutcome {
    Completed,
    Abandoned,
    DeadLettered,
}

impl SettleOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SettleOutcome::Completed => "completed",
            SettleOutcome::Abandoned => "abandoned",
            SettleOutcome::DeadLettered => "dead_lettered",
        }
    }
}

/// Result of a request to an external service (token endpoint, management endpoint).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestOutcome {
    Success,
    /// The entity asked for does not exist (management endpoint only).
    NotFound,
    /// Authentication or authorisation was refused.
    Unauthorized,
    /// Anything else: transport failure, timeout, 5xx, unparsable answer.
    Error,
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Success => "success",
            RequestOutcome::NotFound => "not_found",
            RequestOutcome::Unauthorized => "unauthorized",
            RequestOutcome::Error => "error",
        }
    }
}

/// Where a queue count handed out by the scaler came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CountSource {
    /// Fetched from the management endpoint for this request (or the single-flight it joined).
    Fresh,
    /// Served from the cache within its time to live.
    Cached,
    /// The refresh failed transiently; an older value within the staleness bound was served.
    Stale,
}

impl CountSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CountSource::Fresh => "fresh",
            CountSource::Cached => "cached",
            CountSource::Stale => "stale",
        }
    }
}

macro_rules! label_value_from_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value_from_as_str!(SettleOutcome, RequestOutcome, CountSource);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SettleLabels {
    queue: String,
    outcome: SettleOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: RequestOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServedLabels {
    queue: String,
    outcome: CountSource,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    mode: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.5 ms to ~16 s: covers a local broker and a slow cross-region namespace.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The process's metrics. Cheap to share (`Arc<Metrics>`); every recording method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages_sent: Family<QueueLabels, Counter>,
    messages_received: Family<QueueLabels, Counter>,
    messages_settled: Family<SettleLabels, Counter>,
    send_duration: HistogramFamily<QueueLabels>,
    settle_duration: HistogramFamily<QueueLabels>,
    processing_duration: HistogramFamily<QueueLabels>,
    token_requests: Family<OutcomeLabels, Counter>,
    reconnects: Counter,
    queue_active_messages: Family<QueueLabels, Gauge>,
    queue_dead_letter_messages: Family<QueueLabels, Gauge>,
    management_requests: Family<OutcomeLabels, Counter>,
    scaler_counts_served: Family<ServedLabels, Counter>,
    queue_count_stale: Family<QueueLabels, Gauge>,
}

impl Metrics {
    /// A registry with every family registered, and `servicebusdemo_build_info{version,mode}` set.
    pub fn new(mode: &str) -> Self {
        let mut registry = Registry::with_prefix("servicebusdemo");
        // A gauge fixed at 1 rather than an OpenMetrics `info` family: the classic text
        // format (and promtool) has no `info` type.
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                mode: mode.to_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Version and mode of this process (always 1)",
            build_info,
        );

        let messages_sent = Family::default();
        registry.register(
            "messages_sent",
            "Messages accepted by the broker",
            messages_sent.clone(),
        );
        let messages_received = Family::default();
        registry.register(
            "messages_received",
            "Messages delivered to this consumer",
            messages_received.clone(),
        );
        let messages_settled = Family::default();
        registry.register(
            "messages_settled",
            "Messages settled, by outcome",
            messages_settled.clone(),
        );
        let send_duration: HistogramFamily<QueueLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "send_duration",
            "Time from handing a batch to the sender to the broker's acceptance",
            Unit::Seconds,
            send_duration.clone(),
        );
        let settle_duration: HistogramFamily<QueueLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "settle_duration",
            "Time for the broker to confirm a disposition",
            Unit::Seconds,
            settle_duration.clone(),
        );
        let processing_duration: HistogramFamily<QueueLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "processing_duration",
            "Time spent processing one message, excluding settlement",
            Unit::Seconds,
            processing_duration.clone(),
        );
        let token_requests = Family::default();
        registry.register(
            "token_requests",
            "Entra tokens asked of the credential (cached by it until close to expiry), by outcome",
            token_requests.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "AMQP connection re-establishments after a failure",
            reconnects.clone(),
        );
        let queue_active_messages = Family::default();
        registry.register(
            "queue_active_messages",
            "Active messages in the queue (locked ones included), per the management endpoint",
            queue_active_messages.clone(),
        );
        let queue_dead_letter_messages = Family::default();
        registry.register(
            "queue_dead_letter_messages",
            "Messages in the queue's dead-letter sub-queue, per the management endpoint",
            queue_dead_letter_messages.clone(),
        );
        let management_requests = Family::default();
        registry.register(
            "management_requests",
            "Requests to the Service Bus management (ATOM) endpoint, by outcome",
            management_requests.clone(),
        );
        let scaler_counts_served = Family::default();
        registry.register(
            "scaler_counts_served",
            "Queue counts handed out by the scaler, by where they came from (fresh|cached|stale)",
            scaler_counts_served.clone(),
        );
        let queue_count_stale = Family::default();
        registry.register(
            "queue_count_stale",
            "1 while the last refresh of the queue's count failed and an older value is served",
            queue_count_stale.clone(),
        );

        Metrics {
            registry,
            messages_sent,
            messages_received,
            messages_settled,
            send_duration,
            settle_duration,
            processing_duration,
            token_requests,
            reconnects,
            queue_active_messages,
            queue_dead_letter_messages,
            management_requests,
            scaler_counts_served,
            queue_count_stale,
        }
    }

    fn queue(queue: &str) -> QueueLabels {
        QueueLabels {
            queue: queue.to_owned(),
        }
    }

    /// `n` messages were accepted by the broker.
    pub fn message_sent(&self, queue: &str, n: u64) {
        self.messages_sent
            .get_or_create(&Self::queue(queue))
            .inc_by(n);
    }

    /// `n` messages were delivered to us.
    pub fn message_received(&self, queue: &str, n: u64) {
        self.messages_received
            .get_or_create(&Self::queue(queue))
            .inc_by(n);
    }

    /// One message was settled with `outcome`.
    pub fn message_settled(&self, queue: &str, outcome: SettleOutcome) {
        let labels = SettleLabels {
            queue: queue.to_owned(),
            outcome,
        };
        self.messages_settled.get_or_create(&labels).inc();
    }

    /// A send (one batch) took `elapsed`.
    pub fn observe_send(&self, queue: &str, elapsed: Duration) {
        self.send_duration
            .get_or_create(&Self::queue(queue))
            .observe(elapsed.as_secs_f64());
    }

    /// A disposition took `elapsed` to be confirmed.
    pub fn observe_settle(&self, queue: &str, elapsed: Duration) {
        self.settle_duration
            .get_or_create(&Self::queue(queue))
            .observe(elapsed.as_secs_f64());
    }

    /// Processing one message took `elapsed`.
    pub fn observe_processing(&self, queue: &str, elapsed: Duration) {
        self.processing_duration
            .get_or_create(&Self::queue(queue))
            .observe(elapsed.as_secs_f64());
    }

    /// A token was requested (SAS signed or Entra token exchanged).
    pub fn token_request(&self, outcome: RequestOutcome) {
        self.token_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The AMQP connection was re-established after a failure.
    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// A request to the management (ATOM) endpoint finished with `outcome`.
    pub fn management_request(&self, outcome: RequestOutcome) {
        self.management_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Latest known counts of a queue (scaler gauges).
    pub fn set_queue_counts(&self, queue: &str, active_messages: u64, dead_letter_messages: u64) {
        let labels = Self::queue(queue);
        self.queue_active_messages
            .get_or_create(&labels)
            .set(saturating_i64(active_messages));
        self.queue_dead_letter_messages
            .get_or_create(&labels)
            .set(saturating_i64(dead_letter_messages));
    }

    /// Withdraw the queue's count gauges: there is no value we can stand behind (queue gone,
    /// credentials refused, outage beyond the staleness bound). An absent series is safer
    /// for a Prometheus-driven autoscaler than a frozen one.
    pub fn clear_queue_counts(&self, queue: &str) {
        let labels = Self::queue(queue);
        self.queue_active_messages.remove(&labels);
        self.queue_dead_letter_messages.remove(&labels);
    }

    /// The scaler handed out a count for `queue`, taken from `source`.
    pub fn count_served(&self, queue: &str, source: CountSource) {
        let labels = ServedLabels {
            queue: queue.to_owned(),
            outcome: source,
        };
        self.scaler_counts_served.get_or_create(&labels).inc();
    }

    /// Whether the count currently served for `queue` is stale (its last refresh failed).
    pub fn set_count_stale(&self, queue: &str, stale: bool) {
        self.queue_count_stale
            .get_or_create(&Self::queue(queue))
            .set(i64::from(stale));
    }

    /// The registry in OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Logs and traces
// ---------------------------------------------------------------------------------------------

/// Log line format (`LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What [`init_tracing`] needs; the config layer fills it.
#[derive(Clone, Debug)]
pub struct TracingConfig {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive string (`RUST_LOG`); `None` means `info`.
    pub log_filter: Option<String>,
    /// OTLP gRPC endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`); `None` disables trace export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans, e.g. `servicebusdemo-producer`.
    pub service_name: String,
}

/// Keeps the trace pipeline alive; dropping it flushes and shuts the exporter down.
#[must_use = "dropping the guard shuts down trace export"]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
    exports_traces: bool,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exports_traces(&self) -> bool {
        self.exports_traces
    }
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exports_traces", &self.exports_traces())
            .finish()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            // Flush what is batched so short-lived jobs do not lose their last spans.
            if let Err(err) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("trace export shutdown failed: {err}");
            }
        }
    }
}

/// Install the global `tracing` subscriber (and the OTLP pipeline when configured).
///
/// With an OTLP endpoint this must run inside a Tokio runtime: the gRPC exporter needs it.
/// The W3C trace-context propagator is installed either way, so `traceparent` headers
/// can be written and read.
pub fn init_tracing(config: &TracingConfig) -> Result<TelemetryGuard, TelemetryError> {
    let directives = config.log_filter.as_deref().unwrap_or("info");
    let filter =
        EnvFilter::builder()
            .parse(directives)
            .map_err(|source| TelemetryError::LogFilter {
                filter: directives.to_owned(),
                source,
            })?;

    global::set_text_map_propagator(TraceContextPropagator::new());

    // Spans get OpenTelemetry ids even when nothing is exported: log lines then carry the
    // trace id, and a `traceparent` received in a message is passed on to what we log.
    let exports_traces = config.otlp_endpoint.is_some();
    let tracer_provider = match &config.otlp_endpoint {
        Some(endpoint) => otlp_tracer_provider(endpoint, &config.service_name)?,
        None => local_tracer_provider(&config.service_name),
    };
    global::set_tracer_provider(tracer_provider.clone());
    // Without an exporter, spans only carry their ids into log lines and messages: turning
    // every log line into a span event (its text copied) would be work for nothing, done for
    // every message the consumer logs.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("servicebusdemo"))
        .with_filter(tracing_subscriber::filter::filter_fn(move |metadata| {
            exports_traces || metadata.is_span()
        }));

    // Logs go to stderr so stdout stays free for machine-readable output of the modes.
    let fmt_layer = match config.log_format {
        // Colours only for a person at a terminal, never into files or log collectors.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(log_writer::Stderr)
            .boxed(),
        LogFormat::Json => {
            let json = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false);
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(WithTraceId(json))
                .with_writer(log_writer::Stderr)
                .boxed()
        }
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(fmt_layer)
        .try_init()?;

    Ok(TelemetryGuard {
        tracer_provider: Some(tracer_provider),
        exports_traces,
    })
}

/// JSON event format with the OpenTelemetry `trace_id` of the current span (when traced)
/// as the first field, so log lines can be joined with exported traces.
struct WithTraceId<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceId<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        match (current_trace_id(), line.strip_prefix('{')) {
            (Some(trace_id), Some(rest)) => {
                write!(writer, "{{\"trace_id\":\"{trace_id}\",{rest}")
            }
            _ => writer.write_str(&line),
        }
    }
}

/// The trace id of the current span, when it is recorded by the OpenTelemetry layer.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let current = tracing::Span::current();
    if current.is_disabled() {
        return None;
    }
    let context = current.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

fn otlp_tracer_provider(
    endpoint: &str,
    service_name: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(service_resource(service_name))
        .build())
}

/// Spans with real ids that go nowhere: no processor, so ending a span costs next to nothing.
fn local_tracer_provider(service_name: &str) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_resource(service_resource(service_name))
        .build()
}

/// `Resource::builder` applies the standard OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
/// a name given there wins, `service_name` (one per mode) replaces only the SDK's
/// `unknown_service` placeholder.
fn service_resource(service_name: &str) -> Resource {
    let service_name_key = opentelemetry::Key::from_static_str("service.name");
    let configured = Resource::builder()
        .build()
        .get(&service_name_key)
        .map(|name| name.to_string())
        .filter(|name| !name.starts_with("unknown_service"));
    Resource::builder()
        .with_service_name(configured.unwrap_or_else(|| service_name.to_owned()))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

// ---------------------------------------------------------------------------------------------
// HTTP: /metrics, /healthz, /readyz
// ---------------------------------------------------------------------------------------------

/// Readiness flag served on `/readyz`; the mode sets it when it can do its work.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// The running metrics/health server. Dropping it stops the server.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop accepting connections and wait for in-flight requests to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The routes, for embedding or testing without a socket.
pub fn router(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .with_state(HttpState { metrics, readiness })
}

/// Bind `addr` (port 0 allowed) and serve the routes in the background.
pub async fn serve_http(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> Result<HttpServer, TelemetryError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let app = router(metrics, readiness);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = shutdown_rx.await;
            })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "metrics server failed");
        }
    });
    tracing::info!(addr = %local_addr, "serving /metrics, /healthz, /readyz");
    Ok(HttpServer {
        local_addr,
        shutdown: Some(shutdown_tx),
        task: Some(task),
    })
}

async fn metrics_handler(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    match state.metrics.encode() {
        Ok(body) if wants_openmetrics => {
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
        }
        Ok(body) => (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE)],
            openmetrics_to_prometheus_text(&body),
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Rewrite the OpenMetrics exposition as Prometheus text format 0.0.4: no `# UNIT` or
/// `# EOF` lines, and counter families named with their `_total` suffix, as the samples are.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let _ = writeln!(text, "{prefix}{name}{suffix} {tail}");
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

async fn healthz_handler() -> &'static str {
    "ok\n"
}

async fn readyz_handler(State(state): State<HttpState>) -> Response {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_value<'a>(body: &'a str, series: &str) -> Option<&'a str> {
        body.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn metric_names_and_labels_follow_conventions() {
        let metrics = Metrics::new("producer");
        metrics.message_sent("orders", 3);
        metrics.message_sent("orders", 2);
        metrics.message_received("orders", 4);
        metrics.message_settled("orders", SettleOutcome::DeadLettered);
        metrics.observe_send("orders", Duration::from_millis(3));
        metrics.token_request(RequestOutcome::Success);
        metrics.management_request(RequestOutcome::NotFound);
        metrics.reconnect();
        metrics.set_queue_counts("orders", 7, 1);
        metrics.count_served("orders", CountSource::Stale);
        let body = metrics.encode().expect("encode");

        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_messages_sent_total{queue=\"orders\"}"
            ),
            Some("5")
        );
        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_messages_received_total{queue=\"orders\"}"
            ),
            Some("4")
        );
        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_messages_settled_total{queue=\"orders\",outcome=\"dead_lettered\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_token_requests_total{outcome=\"success\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_management_requests_total{outcome=\"not_found\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample_value(&body, "servicebusdemo_reconnects_total"),
            Some("1")
        );
        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_queue_active_messages{queue=\"orders\"}"
            ),
            Some("7")
        );
        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_queue_dead_letter_messages{queue=\"orders\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample_value(
                &body,
                "servicebusdemo_send_duration_seconds_count{queue=\"orders\"}"
            ),
            Some("1")
        );
        assert!(body.contains("# TYPE servicebusdemo_send_duration_seconds histogram"));
        assert!(body.contains("# UNIT servicebusdemo_send_duration_seconds seconds"));
        let version = env!("CARGO_PKG_VERSION");
        assert!(body.contains(&format!(
            "servicebusdemo_build_info{{version=\"{version}\",mode=\"producer\"}} 1"
        )));
        assert!(body.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn http_endpoints_serve_metrics_health_and_readiness() {
        let metrics = Arc::new(Metrics::new("scaler"));
        metrics.set_queue_counts("q1", 12, 0);
        let readiness = Readiness::new();
        let server = serve_http(
            "127.0.0.1:0".parse().expect("addr"),
            metrics.clone(),
            readiness.clone(),
        )
        .await
        .expect("serve");
        let base = format!("http://{}", server.local_addr());
        // reqwest is built without a bundled provider; the process installs ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();

        let health = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status(), reqwest::StatusCode::OK);

        let not_ready = client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(not_ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        readiness.set_ready(true);
        let ready = client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), reqwest::StatusCode::OK);

        let scraped = client
            .get(format!("{base}/metrics"))
            .header(
                reqwest::header::ACCEPT,
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )
            .send()
            .await
            .expect("metrics");
        assert_eq!(
            scraped
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some(OPENMETRICS_CONTENT_TYPE)
        );
        let body = scraped.text().await.expect("body");
        assert_eq!(
            sample_value(&body, "servicebusdemo_queue_active_messages{queue=\"q1\"}"),
            Some("12")
        );
        assert!(body.ends_with("# EOF\n"));

        // Without OpenMetrics in Accept (curl, promtool): the classic text format.
        let plain = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(
            plain
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some(PROMETHEUS_TEXT_CONTENT_TYPE)
        );
        let text = plain.text().await.expect("body");
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE servicebusdemo_reconnects_total counter"),
            "{text}"
        );
        assert_eq!(
            sample_value(&text, "servicebusdemo_queue_active_messages{queue=\"q1\"}"),
            Some("12")
        );
        server.shutdown().await;
    }

    /// `promtool check metrics` (the real linter) accepts what we serve as text, when installed.
    #[test]
    fn promtool_accepts_the_text_format() {
        use std::io::Write as _;
        let metrics = Metrics::new("consumer");
        metrics.message_received("orders", 3);
        metrics.message_settled("orders", SettleOutcome::Completed);
        metrics.observe_processing("orders", Duration::from_millis(20));
        metrics.observe_settle("orders", Duration::from_millis(2));
        metrics.token_request(RequestOutcome::Success);
        let text = openmetrics_to_prometheus_text(&metrics.encode().expect("encode"));
        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("promtool not installed; the scrape tests with Prometheus cover this");
            return;
        };
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let output = child.wait_with_output().expect("promtool");
        assert!(
            output.status.success(),
            "{}{}\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn bad_log_filter_is_reported_with_the_value() {
        let config = TracingConfig {
            log_format: LogFormat::Json,
            log_filter: Some("info,[=".to_owned()),
            otlp_endpoint: None,
            service_name: "servicebusdemo-test".to_owned(),
        };
        let err = init_tracing(&config).expect_err("invalid filter");
        assert!(err.to_string().contains("info,[="), "{err}");
    }
}

#[cfg(test)]
mod otlp_tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use tokio::sync::mpsc;

    /// An OTLP/gRPC collector that hands every export to the test.
    struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_otlp_collector_with_the_service_name() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collector(tx)))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );

        let provider = otlp_tracer_provider(&format!("http://{addr}"), "servicebusdemo-test")
            .expect("provider");
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("send_batch", queue = "orders");
            let _entered = span.enter();
        });
        // What the guard does on drop: flush the batch and stop.
        let guard = TelemetryGuard {
            tracer_provider: Some(provider),
            exports_traces: true,
        };
        tokio::task::spawn_blocking(move || drop(guard))
            .await
            .expect("flush");

        let export = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an export arrives")
            .expect("export");
        let resource_spans = &export.resource_spans[0];
        let service_name = resource_spans
            .resource
            .as_ref()
            .expect("resource")
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.clone());
        assert_eq!(
            service_name,
            Some(Value::StringValue("servicebusdemo-test".to_owned()))
        );
        let names: Vec<&str> = resource_spans
            .scope_spans
            .iter()
            .flat_map(|scope| scope.spans.iter().map(|span| span.name.as_str()))
            .collect();
        assert_eq!(names, ["send_batch"]);
    }
}
