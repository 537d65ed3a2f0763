//! Trace context carried in messages, so a consumer's span continues the producer's trace.
//!
//! The W3C `traceparent` value travels in two application properties: `traceparent` (what
//! OpenTelemetry-aware readers look for) and `Diagnostic-Id` (what Azure's SDKs read and
//! write). A reader prefers `traceparent` and falls back to `Diagnostic-Id`, so messages
//! sent by Microsoft's SDKs are followed too. When the current span is not traced, nothing
//! is written.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The application property Azure's SDKs use for the trace context.
pub const DIAGNOSTIC_ID: &str = "Diagnostic-Id";
/// The W3C trace-context property.
pub const TRACEPARENT: &str = "traceparent";

/// The application properties that carry the current span's trace into a message (empty
/// when the span is not traced).
pub fn trace_properties() -> Vec<(String, String)> {
    current_traceparent()
        .map(|traceparent| {
            vec![
                (TRACEPARENT.to_string(), traceparent.clone()),
                (DIAGNOSTIC_ID.to_string(), traceparent),
            ]
        })
        .unwrap_or_default()
}

/// The trace context a received message carries, `traceparent` first.
pub fn trace_context_of<'a>(property: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    property(TRACEPARENT)
        .or_else(|| property(DIAGNOSTIC_ID))
        .map(str::to_string)
}

/// The `traceparent` of the current span, if it is being traced.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Make `span` a child of the trace named by `traceparent` (ignored when malformed: the
/// span stays a root, as the W3C specification asks).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let parent: Context = TraceContextPropagator::new().extract(&carrier);
    // Fails only when tracing-opentelemetry is not installed; then there is nothing to link.
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    fn trace_id(span: &tracing::Span) -> opentelemetry::trace::TraceId {
        span.context().span().span_context().trace_id()
    }

    #[test]
    fn nothing_is_written_without_an_active_trace() {
        assert_eq!(current_traceparent(), None);
        assert!(trace_properties().is_empty());
    }

    #[test]
    fn traceparent_wins_over_diagnostic_id() {
        let props = HashMap::from([(TRACEPARENT, "a"), (DIAGNOSTIC_ID, "b")]);
        assert_eq!(
            trace_context_of(|name| props.get(name).copied()),
            Some("a".into())
        );
        let azure_only = HashMap::from([(DIAGNOSTIC_ID, "b")]);
        assert_eq!(
            trace_context_of(|name| azure_only.get(name).copied()),
            Some("b".into())
        );
        assert_eq!(trace_context_of(|_| None), None);
    }

    #[test]
    fn a_trace_crosses_a_message_from_producer_span_to_consumer_span() {
        // No exporter: spans are still recorded with real ids.
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let send = tracing::info_span!("send_batch");
            let properties = send.in_scope(trace_properties);
            let sent = trace_id(&send);
            assert_eq!(properties.len(), 2);
            assert!(properties
                .iter()
                .all(|(_, v)| v.starts_with(&format!("00-{sent}-"))));

            let process = tracing::info_span!("process_message");
            let carried = trace_context_of(|name| {
                properties
                    .iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.as_str())
            })
            .expect("the message carries the trace");
            continue_trace(&process, &carried);
            assert_eq!(trace_id(&process), sent);

            let orphan = tracing::info_span!("process_message");
            continue_trace(&orphan, "not-a-traceparent");
            assert_ne!(trace_id(&orphan), sent);
        });
    }
}
