//! Per-queue cache of management-endpoint counts, with single-flight refresh.
//!
//! On Standard tier every management call costs throughput credits, and KEDA polls each
//! trigger on every polling interval (plus `StreamIsActive` and the background poll here).
//! So each queue has one async lock: the caller that finds the value expired refreshes it
//! while holding the lock, and everyone arriving meanwhile waits and then reads the new
//! value. Failures are remembered for the same interval, so an outage costs no more
//! requests than health. A transient failure serves the last good value while it is
//! younger than the staleness bound, and says so in the metrics.
//!
//! Queue names come from KEDA metadata, so the set of entries must not only grow: a queue
//! that does not exist keeps no entry, and an entry nobody asked about for a while is
//! dropped (it could only serve a value too old to be stale-served anyway).

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

/// An entry is dropped after this many TTLs without a caller (and never before the
/// staleness bound has passed, so a last good value is only lost once it is useless).
const IDLE_EVICTION_TTLS: u32 = 12;

type SharedEntry = Arc<tokio::sync::Mutex<Entry>>;

/// A map slot: the entry and when a caller last asked for it.
struct Slot {
    entry: SharedEntry,
    last_used: Instant,
}

impl Slot {
    /// No caller holds the entry (only the map does), so dropping it loses no answer.
    fn unused(&self) -> bool {
        Arc::strong_count(&self.entry) == 1
    }
}

pub struct CountCache {
    source: Arc<dyn QueueCountSource>,
    settings: CacheSettings,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<String, Slot>>,
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
        let shared = self.entry(queue)?;
        // Single flight: callers queue up here while one of them refreshes.
        let mut entry = shared.lock().await;
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
                if matches!(err, AdminError::QueueNotFound { .. }) {
                    // A typo in the metadata must not hold a slot. Callers already waiting
                    // on this entry still share this answer.
                    self.forget(queue, &shared);
                }
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

    fn entry(&self, queue: &str) -> Result<SharedEntry, CountError> {
        let now = Instant::now();
        let mut entries = self.lock_entries();
        if let Some(slot) = entries.get_mut(queue) {
            slot.last_used = now;
            return Ok(slot.entry.clone());
        }
        self.evict_idle(&mut entries, now);
        if entries.len() >= self.settings.max_queues {
            return Err(CountError::TooManyQueues {
                queue: queue.to_owned(),
                limit: self.settings.max_queues,
            });
        }
        let entry = SharedEntry::default();
        entries.insert(
            queue.to_owned(),
            Slot {
                entry: entry.clone(),
                last_used: now,
            },
        );
        Ok(entry)
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is intact.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drop `queue`'s entry if it is still `entry` (a newer one may have replaced it).
    fn forget(&self, queue: &str, entry: &SharedEntry) {
        let mut entries = self.lock_entries();
        if entries
            .get(queue)
            .is_some_and(|slot| Arc::ptr_eq(&slot.entry, entry))
        {
            entries.remove(queue);
        }
    }

    /// Before adding an entry: drop those nobody asked about for [`Self::idle_limit`]; if
    /// the map is still full, the least recently used entry idle for at least a TTL (its
    /// value has expired, so its next caller would have refreshed it anyway).
    fn evict_idle(&self, entries: &mut HashMap<String, Slot>, now: Instant) {
        let idle_limit = self.idle_limit();
        let long_idle: Vec<String> = entries
            .iter()
            .filter(|(_, slot)| slot.unused() && now.duration_since(slot.last_used) >= idle_limit)
            .map(|(queue, _)| queue.clone())
            .collect();
        for queue in &long_idle {
            self.evict(entries, queue);
        }
        if entries.len() < self.settings.max_queues {
            return;
        }
        let least_recent = entries
            .iter()
            .filter(|(_, slot)| {
                slot.unused() && now.duration_since(slot.last_used) >= self.settings.ttl
            })
            .min_by_key(|(_, slot)| slot.last_used)
            .map(|(queue, _)| queue.clone());
        if let Some(queue) = least_recent {
            self.evict(entries, &queue);
        }
    }

    fn evict(&self, entries: &mut HashMap<String, Slot>, queue: &str) {
        entries.remove(queue);
        // The gauges would otherwise show the last count forever.
        self.metrics.clear_queue_counts(queue);
        tracing::debug!(queue, "dropped idle queue count");
    }

    fn idle_limit(&self) -> Duration {
        (self.settings.ttl * IDLE_EVICTION_TTLS).max(self.settings.max_staleness)
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
        cache_with_limit(source, 3)
    }

    fn cache_with_limit(
        source: Arc<FakeSource>,
        max_queues: usize,
    ) -> (Arc<CountCache>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new("scaler"));
        let settings = CacheSettings {
            ttl: TTL,
            max_staleness: Duration::from_secs(60),
            max_queues,
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
        let source = Arc::new(FakeSource {
            delay: Duration::from_millis(200),
            ..FakeSource::default()
        });
        source.active.store(5, Ordering::SeqCst);
        let (cache, _) = cache_with(source.clone());
        cache.get("orders").await.expect("first");
        source.fail(Some(404));
        tokio::time::advance(TTL).await;

        // Concurrent callers share the failed attempt.
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("orders").await })
            })
            .collect();
        for caller in callers {
            let err = caller.await.expect("join").expect_err("deleted queue");
            assert!(
                matches!(err, CountError::Admin(ref e) if matches!(**e, AdminError::QueueNotFound { .. }))
            );
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_queues_do_not_take_slots() {
        let source = Arc::new(FakeSource::default());
        let (cache, _) = cache_with(source.clone());
        source.fail(Some(404));
        for typo in ["ordres", "order", "oders", "orders-"] {
            cache.get(typo).await.expect_err("no such queue");
        }
        // Nothing is remembered about a queue that does not exist: asking again asks again.
        cache.get("ordres").await.expect_err("still no such queue");
        assert_eq!(source.calls.load(Ordering::SeqCst), 5);

        source.fail(None);
        for queue in ["a", "b", "c"] {
            cache.get(queue).await.expect("real queues still fit");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_the_least_recently_used_expired_entry_makes_room() {
        let source = Arc::new(FakeSource::default());
        source.active.store(4, Ordering::SeqCst);
        let (cache, metrics) = cache_with(source.clone());
        for queue in ["a", "b", "c"] {
            cache.get(queue).await.expect("within limit");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Every entry was used within the TTL: nothing may be dropped yet.
        let err = cache.get("d").await.expect_err("full");
        assert!(matches!(err, CountError::TooManyQueues { limit: 3, .. }));

        tokio::time::advance(TTL).await;
        cache.get("d").await.expect("room made");
        assert_eq!(source.calls.load(Ordering::SeqCst), 4);
        let body = scrape(&metrics);
        assert!(
            !body.contains("servicebusdemo_queue_active_messages{queue=\"a\"}"),
            "{body}"
        );
        assert!(body.contains("servicebusdemo_queue_active_messages{queue=\"b\"} 4"));
    }

    #[tokio::test(start_paused = true)]
    async fn long_idle_entries_are_dropped() {
        let source = Arc::new(FakeSource::default());
        source.active.store(8, Ordering::SeqCst);
        // Plenty of room: only idleness drops an entry here.
        let (cache, metrics) = cache_with_limit(source.clone(), 16);
        cache.get("a").await.expect("a");
        cache.get("b").await.expect("b");
        tokio::time::advance(TTL * IDLE_EVICTION_TTLS - Duration::from_secs(1)).await;
        cache.get("b").await.expect("b again");
        cache.get("c").await.expect("c");
        assert!(scrape(&metrics).contains("servicebusdemo_queue_active_messages{queue=\"a\"} 8"));

        tokio::time::advance(Duration::from_secs(1)).await;
        cache.get("d").await.expect("d");
        let body = scrape(&metrics);
        assert!(
            !body.contains("servicebusdemo_queue_active_messages{queue=\"a\"}"),
            "a was idle for {IDLE_EVICTION_TTLS} TTLs: {body}"
        );
        assert!(body.contains("servicebusdemo_queue_active_messages{queue=\"b\"} 8"));
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
