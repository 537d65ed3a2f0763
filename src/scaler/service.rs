//! The `externalscaler.ExternalScaler` gRPC service, as KEDA calls it.
//!
//! KEDA's ScaledJob loop calls `GetMetricSpec` for the target, `GetMetrics` for the value
//! and `IsActive` for activation on every polling interval; `external-push` triggers keep a
//! `StreamIsActive` stream open instead. All of them read the same cached count.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use super::cache::{CountCache, CountError};
use super::metadata::{self, MetadataError, TriggerMetadata};
use super::proto::external_scaler_server::ExternalScaler;
use super::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use crate::servicebus::admin::AdminError;

pub struct ScalerService {
    cache: Arc<CountCache>,
    namespace_host: String,
    /// How often an open `StreamIsActive` re-checks the (cached) count.
    push_interval: Duration,
    /// Flips to `true` at shutdown: open streams end so graceful shutdown can finish.
    stopping: watch::Receiver<bool>,
}

impl ScalerService {
    pub fn new(
        cache: Arc<CountCache>,
        namespace_host: String,
        push_interval: Duration,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        ScalerService {
            cache,
            namespace_host,
            push_interval,
            stopping,
        }
    }

    fn metadata(&self, scaled_object: Option<&ScaledObjectRef>) -> Result<TriggerMetadata, Status> {
        let scaled_object =
            scaled_object.ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        metadata::parse(&scaled_object.scaler_metadata, &self.namespace_host)
            .map_err(|err| metadata_status(&err))
    }

    async fn active_messages(&self, trigger: &TriggerMetadata) -> Result<u64, Status> {
        let reading = self
            .cache
            .get(&trigger.queue)
            .await
            .map_err(|err| count_status(&err))?;
        Ok(reading.counts.active_messages)
    }
}

fn metadata_status(err: &MetadataError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// Map count failures to the gRPC codes a KEDA operator (or a human reading its events)
/// can act on. KEDA treats every error the same way; the code and message are for people.
fn count_status(err: &CountError) -> Status {
    match err {
        CountError::TooManyQueues { .. } => Status::resource_exhausted(err.to_string()),
        CountError::Admin(admin) => match admin.as_ref() {
            AdminError::QueueNotFound { .. } => Status::not_found(err.to_string()),
            AdminError::InvalidQueueName { .. } => Status::invalid_argument(err.to_string()),
            AdminError::Unauthorized { .. } => Status::permission_denied(err.to_string()),
            other if other.is_transient() => Status::unavailable(err.to_string()),
            _ => Status::internal(err.to_string()),
        },
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

type IsActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

/// One span per RPC, named after it (`otel.name`), with the queue once known.
fn rpc_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "rpc",
        otel.name = method,
        rpc.system = "grpc",
        rpc.method = method,
        queue = tracing::field::Empty
    )
}

impl ScalerService {
    /// Parse the metadata and note the queue on the current RPC span.
    fn trigger(&self, scaled_object: Option<&ScaledObjectRef>) -> Result<TriggerMetadata, Status> {
        let trigger = self.metadata(scaled_object)?;
        tracing::Span::current().record("queue", trigger.queue.as_str());
        Ok(trigger)
    }

    async fn is_active_rpc(
        &self,
        scaled_object: &ScaledObjectRef,
    ) -> Result<IsActiveResponse, Status> {
        let trigger = self.trigger(Some(scaled_object))?;
        let active_messages = self.active_messages(&trigger).await?;
        Ok(IsActiveResponse {
            result: trigger.is_active(active_messages),
        })
    }

    fn get_metric_spec_rpc(
        &self,
        scaled_object: &ScaledObjectRef,
    ) -> Result<GetMetricSpecResponse, Status> {
        let trigger = self.trigger(Some(scaled_object))?;
        // u64 -> f64 is exact for any realistic message count (< 2^53).
        let target = trigger.target_messages as f64;
        Ok(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: trigger.metric_name(),
                target_size: saturating_i64(trigger.target_messages),
                target_size_float: target,
            }],
        })
    }

    async fn get_metrics_rpc(
        &self,
        request: GetMetricsRequest,
    ) -> Result<GetMetricsResponse, Status> {
        let trigger = self.trigger(request.scaled_object_ref.as_ref())?;
        let active_messages = self.active_messages(&trigger).await?;
        // KEDA asks with the name GetMetricSpec gave it (minus its index prefix) and keys
        // the answer by its own name, so echo what was asked for.
        let metric_name = if request.metric_name.is_empty() {
            trigger.metric_name()
        } else {
            request.metric_name
        };
        Ok(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                metric_value: saturating_i64(active_messages),
                metric_value_float: active_messages as f64,
            }],
        })
    }
}

/// Log a refused call once, at the level its cause deserves.
fn log_outcome<T>(result: &Result<T, Status>) {
    if let Err(status) = result {
        match status.code() {
            Code::InvalidArgument | Code::NotFound | Code::ResourceExhausted => {
                tracing::warn!(code = ?status.code(), message = status.message(), "call refused")
            }
            _ => tracing::error!(code = ?status.code(), message = status.message(), "call failed"),
        }
    }
}

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let span = rpc_span("IsActive");
        let result = self
            .is_active_rpc(request.get_ref())
            .instrument(span.clone())
            .await;
        span.in_scope(|| log_outcome(&result));
        result.map(Response::new)
    }

    type StreamIsActiveStream = IsActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let span = rpc_span("StreamIsActive");
        let trigger = span.in_scope(|| {
            let result = self.trigger(Some(request.get_ref()));
            log_outcome(&result);
            result
        })?;
        let (tx, rx) = mpsc::channel(1);
        let cache = Arc::clone(&self.cache);
        let push_interval = self.push_interval;
        let stopping = self.stopping.clone();
        tokio::spawn(push_activity(cache, trigger, push_interval, tx, stopping).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let span = rpc_span("GetMetricSpec");
        let result = span.in_scope(|| self.get_metric_spec_rpc(request.get_ref()));
        span.in_scope(|| log_outcome(&result));
        result.map(Response::new)
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let span = rpc_span("GetMetrics");
        let result = self
            .get_metrics_rpc(request.into_inner())
            .instrument(span.clone())
            .await;
        span.in_scope(|| log_outcome(&result));
        result.map(Response::new)
    }
}

/// Send the activity now and again whenever it changes, until the client goes away or the
/// scaler stops. A count failure ends the stream with its status; KEDA reopens it with backoff.
async fn push_activity(
    cache: Arc<CountCache>,
    trigger: TriggerMetadata,
    push_interval: Duration,
    tx: mpsc::Sender<Result<IsActiveResponse, Status>>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(push_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent: Option<bool> = None;
    loop {
        if *stopping.borrow() {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = stopping.changed() => return,
            _ = ticker.tick() => {}
        }
        let active = match cache.get(&trigger.queue).await {
            Ok(reading) => trigger.is_active(reading.counts.active_messages),
            Err(err) => {
                let _ = tx.send(Err(count_status(&err))).await;
                return;
            }
        };
        if last_sent != Some(active) {
            if tx
                .send(Ok(IsActiveResponse { result: active }))
                .await
                .is_err()
            {
                return;
            }
            last_sent = Some(active);
        }
    }
}
