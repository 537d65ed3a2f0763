//! Per-queue cache of management-endpoint counts, with single-flight refresh.
//!
//! On Standard tier every management call costs throughput credits, and KEDA polls each
//! trigger on every polling interval (plus `StreamIsActive` and the background poll here).
//! So each queue has one async lock: the caller that finds the value expired refreshes it
//! while holding the lock, and everyone arriving meanwhile waits and then reads the new
//! value. Failures are remembered for the same interval, so an outage costs no more
//! requests than health. A transient failure serves the last good value while it is
//! younger than the staleness bound, and says so in the metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::servicebus::admin::{AdminClient, AdminError, QueueCounts};
use crate::telemetry::{CountSource, Metrics};

/// Where counts come from: the management endpoint in production, a fake in tests.
#[async_trait]
pub trait QueueCountSource: Send + Sync + 'static {
    async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, AdminError>;
}

#[async_trait]
impl QueueCountSource for AdminClient {
    async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, AdminError> {
        AdminClient::queue_counts(self, queue).await
    }
}

/// A count handed out by the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountReading {
    pub counts: QueueCounts,
    pub source: CountSource,
    /// How long ago the management endpoint produced these counts.
    pub age: Duration,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum CountError {
    #[error(transparent)]
    Admin(Arc<AdminError>),
    #[error("this scaler already tracks {limit} queues; refusing {queue:?}")]
    TooManyQueues { queue: String, limit: usize },
}

/// Cache settings.
#[derive(Clone, Copy, Debug)]
pub struct CacheSettings {
    /// A count (or failure) is reused for this long.
    pub ttl: Duration,
    /// On a transient failure, a last good count younger than this is still served.
    pub max_staleness: Duration,
    /// Bound on distinct queues (memory and metric label cardinality).
    pub max_queues: usize,
}

#[derive(Debug, Default)]
struct Entry {
    last_good: Option<(QueueCounts, Instant)>,
    last_attempt: Option<Instant>,
    /// Error of the last attempt, when it failed.
    last_error: Option<Arc<AdminError>>,
}

pub struct CountCache {
    source: Arc<dyn QueueCountSource>,
    settings: CacheSettings,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
}

impl std::fmt::Debug for CountCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountCache")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl CountCache {
    pub fn new(
        source: Arc<dyn QueueCountSource>,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        CountCache {
            source,
            settings,
            metrics,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The queue's counts: cached within the TTL, otherwise refreshed once for all
    /// concurrent callers.
    pub async fn get(&self, queue: &str) -> Result<CountReading, CountError> {
        let entry = self.entry(queue)?;
        // Single flight: callers queue up here while one of them refreshes.
        let mut entry = entry.lock().await;
        let now = Instant::now();
        let fresh_enough = entry
            .last_attempt
            .is_some_and(|attempt| now.duration_since(attempt) < self.settings.ttl);
        if fresh_enough {
            return self.answer(queue, &entry, now, CountSource::Cached);
        }

        entry.last_attempt = Some(now);
        match self.source.queue_counts(queue).await {
            Ok(counts) => {
                entry.last_good = Some((counts, Instant::now()));
                entry.last_error = None;
                self.metrics.set_queue_counts(
                    queue,
                    counts.active_messages,
                    counts.dead_letter_messages,
                );
                self.metrics.set_count_stale(queue, false);
            }
            Err(err) => {
                tracing::warn!(queue, error = %err, transient = err.is_transient(), "refreshing the queue count failed");
                entry.last_error = Some(Arc::new(err));
            }
        }
        self.answer(queue, &entry, Instant::now(), CountSource::Fresh)
    }

    /// Answer from the entry's state after its last attempt.
    fn answer(
        &self,
        queue: &str,
        entry: &Entry,
        now: Instant,
        source_if_ok: CountSource,
    ) -> Result<CountReading, CountError> {
        let reading = |source, (counts, at): (QueueCounts, Instant)| CountReading {
            counts,
            source,
            age: now.duration_since(at),
        };
        match (&entry.last_error, entry.last_good) {
            (None, Some(good)) => {
                self.metrics.count_served(queue, source_if_ok);
                Ok(reading(source_if_ok, good))
            }
            (Some(err), Some(good))
                if err.is_transient()
                    && now.duration_since(good.1) <= self.settings.max_staleness =>
            {
                self.metrics.count_served(queue, CountSource::Stale);
                self.metrics.set_count_stale(queue, true);
                Ok(reading(CountSource::Stale, good))
            }
            (Some(err), _) => {
                // No value we can stand behind: stop exporting one.
                self.metrics.clear_queue_counts(queue);
                Err(CountError::Admin(err.clone()))
            }
            (None, None) => Err(CountError::Admin(Arc::new(AdminError::InvalidResponse {
                queue: queue.to_owned(),
                reason: "no count has been fetched yet".to_owned(),
            }))),
        }
    }

    fn entry(&self, queue: &str) -> Result<Arc<tokio::sync::Mutex<Entry>>, CountError> {
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is intact.
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = entries.get(queue) {
            return Ok(entry.clone());
        }
        if entries.len() >= self.settings.max_queues {
            return Err(CountError::TooManyQueues {
                queue: queue.to_owned(),
                limit: self.settings.max_queues,
            });
        }
        let entry = Arc::new(tokio::sync::Mutex::new(Entry::default()));
        entries.insert(queue.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Refresh `queues` every TTL so the gauges on `/metrics` stay current with no gRPC
    /// caller at all. Each poll goes through the cache, so it shares requests with KEDA's.
    pub fn spawn_poller(self: &Arc<Self>, queues: Vec<String>) -> JoinHandle<()> {
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            if queues.is_empty() {
                return;
            }
            let mut ticker = tokio::time::interval(cache.settings.ttl);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                for queue in &queues {
                    match cache.get(queue).await {
                        Ok(reading) => tracing::debug!(
                            queue = queue.as_str(),
                            active_messages = reading.counts.active_messages,
                            dead_letter_messages = reading.counts.dead_letter_messages,
                            source = reading.source.as_str(),
                            "polled queue count"
                        ),
                        Err(err) => {
                            tracing::debug!(queue = queue.as_str(), error = %err, "poll failed")
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// Counts calls; answers `active` or, while `fail_with` is set, an error of that status.
    #[derive(Default)]
    struct FakeSource {
        calls: AtomicUsize,
        active: AtomicU64,
        fail_with: Mutex<Option<u16>>,
        delay: Duration,
    }

    #[async_trait]
    impl QueueCountSource for FakeSource {
        async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, AdminError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let failing = *self.fail_with.lock().unwrap_or_else(|p| p.into_inner());
            match failing {
                Some(404) => Err(AdminError::QueueNotFound {
                    queue: queue.to_owned(),
                }),
                Some(status) => Err(AdminError::Status {
                    queue: queue.to_owned(),
                    status,
                    detail: "injected".to_owned(),
                }),
                None => Ok(QueueCounts {
                    active_messages: self.active.load(Ordering::SeqCst),
                    dead_letter_messages: 2,
                    ..QueueCounts::default()
                }),
            }
        }
    }

    impl FakeSource {
        fn fail(&self, status: Option<u16>) {
            *self.fail_with.lock().unwrap_or_else(|p| p.into_inner()) = status;
        }
    }

    const TTL: Duration = Duration::from_secs(5);

    fn cache_with(source: Arc<FakeSource>) -> (Arc<CountCache>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new("scaler"));
        let settings = CacheSettings {
            ttl: TTL,
            max_staleness: Duration::from_secs(60),
            max_queues: 3,
        };
        (
            Arc::new(CountCache::new(source, settings, metrics.clone())),
            metrics,
        )
    }

    fn scrape(metrics: &Metrics) -> String {
        metrics.encode().expect("encode")
    }

    #[tokio::test(start_paused = true)]
    async fn thousand_concurrent_callers_cost_one_request_per_interval() {
        let source = Arc::new(FakeSource {
            delay: Duration::from_millis(200),
            ..FakeSource::default()
        });
        source.active.store(42, Ordering::SeqCst);
        let (cache, metrics) = cache_with(source.clone());

        let callers: Vec<_> = (0..1000)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("orders").await })
            })
            .collect();
        let mut fresh = 0;
        for caller in callers {
            let reading = caller.await.expect("join").expect("count");
            assert_eq!(reading.counts.active_messages, 42);
            if reading.source == CountSource::Fresh {
                fresh += 1;
            }
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert_eq!(fresh, 1, "exactly one caller performed the refresh");

        // Still within the interval: no new request.
        tokio::time::advance(Duration::from_secs(3)).await;
        source.active.store(7, Ordering::SeqCst);
        let cached = cache.get("orders").await.expect("count");
        assert_eq!(cached.counts.active_messages, 42);
        assert_eq!(cached.source, CountSource::Cached);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);

        // Past the interval: one new request for the next wave of callers.
        tokio::time::advance(TTL).await;
        let callers: Vec<_> = (0..1000)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("orders").await })
            })
            .collect();
        for caller in callers {
            let reading = caller.await.expect("join").expect("count");
            assert_eq!(reading.counts.active_messages, 7);
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        assert!(
            scrape(&metrics).contains("servicebusdemo_queue_active_messages{queue=\"orders\"} 7")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn queues_are_cached_independently() {
        let source = Arc::new(FakeSource::default());
        let (cache, _) = cache_with(source.clone());
        cache.get("a").await.expect("a");
        cache.get("b").await.expect("b");
        cache.get("a").await.expect("a again");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failure_serves_recent_value_marked_stale() {
        let source = Arc::new(FakeSource::default());
        source.active.store(9, Ordering::SeqCst);
        let (cache, metrics) = cache_with(source.clone());
        cache.get("orders").await.expect("first");

        source.fail(Some(503));
        tokio::time::advance(TTL).await;
        let stale = cache.get("orders").await.expect("stale value");
        assert_eq!(stale.source, CountSource::Stale);
        assert_eq!(stale.counts.active_messages, 9);
        assert!(stale.age >= TTL);
        let body = scrape(&metrics);
        assert!(
            body.contains("servicebusdemo_queue_count_stale{queue=\"orders\"} 1"),
            "{body}"
        );
        assert!(body.contains(
            "servicebusdemo_scaler_counts_served_total{queue=\"orders\",outcome=\"stale\"} 1"
        ));

        // The failure is remembered for the interval too: no request storm during an outage.
        let again = cache.get("orders").await.expect("stale again");
        assert_eq!(again.source, CountSource::Stale);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);

        // Beyond the staleness bound the error surfaces and the gauge is withdrawn.
        tokio::time::advance(Duration::from_secs(61)).await;
        let err = cache.get("orders").await.expect_err("too old");
        assert!(matches!(err, CountError::Admin(ref e) if e.is_transient()));
        assert!(
            !scrape(&metrics).contains("servicebusdemo_queue_active_messages{queue=\"orders\"}")
        );

        // Recovery clears the stale flag.
        source.fail(None);
        tokio::time::advance(TTL).await;
        let recovered = cache.get("orders").await.expect("recovered");
        assert_eq!(recovered.source, CountSource::Fresh);
        assert!(scrape(&metrics).contains("servicebusdemo_queue_count_stale{queue=\"orders\"} 0"));
    }

    #[tokio::test(start_paused = true)]
    async fn missing_queue_is_an_error_not_a_stale_or_zero_value() {
        let source = Arc::new(FakeSource::default());
        source.active.store(5, Ordering::SeqCst);
        let (cache, _) = cache_with(source.clone());
        cache.get("orders").await.expect("first");
        source.fail(Some(404));
        tokio::time::advance(TTL).await;
        let err = cache.get("orders").await.expect_err("deleted queue");
        assert!(
            matches!(err, CountError::Admin(ref e) if matches!(**e, AdminError::QueueNotFound { .. }))
        );

        // Concurrent callers share the failed attempt as well.
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("orders").await })
            })
            .collect();
        for caller in callers {
            assert!(caller.await.expect("join").is_err());
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn distinct_queues_are_bounded() {
        let source = Arc::new(FakeSource::default());
        let (cache, _) = cache_with(source);
        for queue in ["a", "b", "c"] {
            cache.get(queue).await.expect("within limit");
        }
        let err = cache.get("d").await.expect_err("over limit");
        assert!(matches!(err, CountError::TooManyQueues { limit: 3, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn poller_keeps_gauges_current_without_callers() {
        let source = Arc::new(FakeSource::default());
        source.active.store(3, Ordering::SeqCst);
        let (cache, metrics) = cache_with(source.clone());
        let poller = cache.spawn_poller(vec!["orders".to_owned()]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            scrape(&metrics).contains("servicebusdemo_queue_active_messages{queue=\"orders\"} 3")
        );

        source.active.store(11, Ordering::SeqCst);
        tokio::time::sleep(TTL).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            scrape(&metrics).contains("servicebusdemo_queue_active_messages{queue=\"orders\"} 11")
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        poller.abort();
    }
}
