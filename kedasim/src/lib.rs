//! kedasim: KEDA's ScaledJob controller loop, for machines without Kubernetes.
//!
//! It talks to an external scaler exactly as KEDA does (`GetMetricSpec`, `GetMetrics`,
//! `IsActive` every polling interval), decides how many Jobs to create with KEDA's default
//! scaling strategy, runs each Job as a local process, and reports the events
//! `kubectl describe scaledjob` would show (`KEDAJobsCreated … Created N jobs`).

pub mod driver;
pub mod strategy;

/// Generated from the workspace's `proto/externalscaler.proto`.
pub mod proto {
    tonic::include_proto!("externalscaler");
}
