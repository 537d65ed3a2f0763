//! KEDA's ScaledJob arithmetic for a single trigger with the default scaling strategy.
//!
//! Mirrors `pkg/scaling/scaledjob` and `pkg/scaling/executor/scale_jobs.go`:
//! `queueLength` is the metric value, `maxValue = min(queueLength / target, maxReplicaCount)`,
//! and the default strategy creates `min(ceil(queueLength), ceil(maxValue) - running)` jobs
//! while the trigger is active (running jobs below `minReplicaCount` are topped up first).

/// One trigger's answer for a polling interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TriggerReading {
    /// Sum of the values `GetMetrics` returned for the spec's metric.
    pub queue_length: f64,
    /// `targetSizeFloat` (or `targetSize` when that is 0) from `GetMetricSpec`.
    pub target: f64,
    /// `IsActive`.
    pub is_active: bool,
}

/// ScaledJob replica bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaBounds {
    pub min_replica_count: i64,
    pub max_replica_count: i64,
}

impl Default for ReplicaBounds {
    /// KEDA's defaults.
    fn default() -> Self {
        ReplicaBounds {
            min_replica_count: 0,
            max_replica_count: 100,
        }
    }
}

/// What the controller decided in one polling interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub is_active: bool,
    /// `ceil(queueLength)`, KEDA's `scaleTo`.
    pub scale_to: i64,
    /// `ceil(min(queueLength / target, maxReplicaCount))`, KEDA's `maxScale`.
    pub max_scale: i64,
    /// Jobs that may still be created, after subtracting the running ones.
    pub effective_max_scale: i64,
    /// Jobs to create now.
    pub jobs_to_create: i64,
}

/// Decide for one trigger (`reading`, `None` when the scaler failed) and `running` unfinished
/// jobs.
pub fn decide(reading: Option<TriggerReading>, bounds: ReplicaBounds, running: i64) -> Decision {
    // IsScaledJobActive with a single scaler: an inactive (or failed) trigger contributes
    // nothing; a minimum replica count keeps the ScaledJob active regardless.
    let (queue_length, max_value, mut is_active) = match reading {
        Some(r) if r.is_active && r.queue_length > 0.0 => {
            let max_value = if r.target != 0.0 {
                (r.queue_length / r.target).min(bounds.max_replica_count as f64)
            } else {
                0.0
            };
            (r.queue_length, max_value, true)
        }
        _ => (0.0, 0.0, false),
    };
    if bounds.min_replica_count > 0 {
        is_active = true;
    }
    let mut scale_to = ceil_i64(queue_length);
    let max_scale = ceil_i64(max_value);

    let effective_max_scale = if running < bounds.min_replica_count {
        let missing = bounds.min_replica_count - running;
        scale_to = missing;
        missing
    } else {
        // The default strategy: maxScale minus the jobs already running (above the minimum).
        max_scale - (running - bounds.min_replica_count)
    }
    .max(0);

    let jobs_to_create = if is_active && effective_max_scale > 0 {
        scale_to.min(effective_max_scale)
    } else {
        0
    };
    Decision {
        is_active,
        scale_to,
        max_scale,
        effective_max_scale,
        jobs_to_create,
    }
}

fn ceil_i64(value: f64) -> i64 {
    // Saturating float-to-int conversion; values here are small and non-negative.
    value.ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(queue_length: f64, target: f64, is_active: bool) -> Option<TriggerReading> {
        Some(TriggerReading {
            queue_length,
            target,
            is_active,
        })
    }

    const DEFAULT: ReplicaBounds = ReplicaBounds {
        min_replica_count: 0,
        max_replica_count: 100,
    };

    #[test]
    fn tutorial_first_poll_creates_ten_jobs() {
        let d = decide(reading(100.0, 10.0, true), DEFAULT, 0);
        assert_eq!(d.max_scale, 10);
        assert_eq!(d.jobs_to_create, 10);
    }

    #[test]
    fn running_jobs_are_subtracted() {
        assert_eq!(
            decide(reading(100.0, 10.0, true), DEFAULT, 10).jobs_to_create,
            0
        );
        assert_eq!(
            decide(reading(100.0, 10.0, true), DEFAULT, 7).jobs_to_create,
            3
        );
        assert_eq!(
            decide(reading(35.0, 10.0, true), DEFAULT, 1).jobs_to_create,
            3
        );
        // More running than needed never goes negative.
        assert_eq!(
            decide(reading(5.0, 10.0, true), DEFAULT, 4).effective_max_scale,
            0
        );
    }

    #[test]
    fn partial_batches_round_up_and_max_replicas_cap() {
        assert_eq!(
            decide(reading(1.0, 10.0, true), DEFAULT, 0).jobs_to_create,
            1
        );
        assert_eq!(
            decide(reading(101.0, 10.0, true), DEFAULT, 0).jobs_to_create,
            11
        );
        let capped = ReplicaBounds {
            min_replica_count: 0,
            max_replica_count: 4,
        };
        assert_eq!(
            decide(reading(100.0, 10.0, true), capped, 0).jobs_to_create,
            4
        );
        assert_eq!(
            decide(reading(100.0, 10.0, true), capped, 3).jobs_to_create,
            1
        );
    }

    #[test]
    fn small_queue_is_capped_by_its_length() {
        // scaleTo = ceil(queueLength) limits jobs when the target is below 1.
        let d = decide(reading(3.0, 0.5, true), DEFAULT, 0);
        assert_eq!(d.max_scale, 6);
        assert_eq!(d.jobs_to_create, 3);
    }

    #[test]
    fn inactive_or_failed_trigger_creates_nothing() {
        assert_eq!(
            decide(reading(100.0, 10.0, false), DEFAULT, 0).jobs_to_create,
            0
        );
        assert_eq!(
            decide(reading(0.0, 10.0, true), DEFAULT, 0).jobs_to_create,
            0
        );
        let failed = decide(None, DEFAULT, 0);
        assert!(!failed.is_active);
        assert_eq!(failed.jobs_to_create, 0);
    }

    #[test]
    fn min_replicas_are_kept_running() {
        let bounds = ReplicaBounds {
            min_replica_count: 2,
            max_replica_count: 10,
        };
        let idle = decide(reading(0.0, 10.0, false), bounds, 0);
        assert!(idle.is_active);
        assert_eq!(idle.jobs_to_create, 2);
        assert_eq!(
            decide(reading(0.0, 10.0, false), bounds, 2).jobs_to_create,
            0
        );
        // Above the minimum the default strategy applies to the extra jobs only.
        assert_eq!(
            decide(reading(50.0, 10.0, true), bounds, 2).jobs_to_create,
            5
        );
    }
}
