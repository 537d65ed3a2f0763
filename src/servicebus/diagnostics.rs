//! Trace context carried in messages, so a consumer's span continues the producer's trace.
//!
//! Azure's SDKs carry it in the `Diagnostic-Id` application property as a W3C `traceparent`
//! value; we read and write the same property. When no OpenTelemetry layer is installed the
//! current span has no valid context and nothing is written.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The application property Azure's SDKs use for the trace context.
pub const DIAGNOSTIC_ID: &str = "Diagnostic-Id";
const TRACEPARENT: &str = "traceparent";

/// The `traceparent` of the current span, if it is being traced.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Make `span` a child of the trace named by `traceparent` (ignored when malformed).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let parent: Context = TraceContextPropagator::new().extract(&carrier);
    // Fails only when tracing-opentelemetry is not installed; then there is nothing to link.
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_context_without_an_active_trace() {
        assert_eq!(current_traceparent(), None);
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        let span = tracing::info_span!("test");
        continue_trace(&span, "not-a-traceparent");
    }
}
