//! Fault switches the process layer owns (the broker owns the AMQP-level ones), and the request
//! counters the admin route reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Switches flipped by `/$admin/*` routes.
#[derive(Debug, Default)]
pub struct Faults {
    refuse_connections: FaultWindow,
    /// Lifetime of newly issued access tokens in seconds; 0 = the configured default.
    token_lifetime_secs: AtomicU64,
}

impl Faults {
    /// Refuse (accept and close at once) new AMQP connections for `duration`; zero ends it.
    pub fn refuse_connections_for(&self, duration: Duration) {
        self.refuse_connections.open_for(duration);
    }

    /// Whether new AMQP connections are refused right now.
    pub fn refusing_connections(&self) -> bool {
        self.refuse_connections.is_open()
    }

    /// Time left of the refusal window, for the stats route.
    pub fn refusing_for(&self) -> Duration {
        self.refuse_connections.remaining()
    }

    /// Overrides the lifetime of tokens issued from now on; `None` restores the default.
    pub fn set_token_lifetime(&self, lifetime: Option<Duration>) {
        let secs = lifetime.map_or(0, |d| d.as_secs().max(1));
        self.token_lifetime_secs.store(secs, Ordering::Relaxed);
    }

    pub fn token_lifetime_override(&self) -> Option<Duration> {
        match self.token_lifetime_secs.load(Ordering::Relaxed) {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        }
    }
}

/// A fault switched on until a deadline (the process layer's and the broker's switches).
#[derive(Debug, Default)]
pub struct FaultWindow {
    until: Mutex<Option<Instant>>,
}

impl FaultWindow {
    /// Open for `duration` from now; zero closes it.
    pub fn open_for(&self, duration: Duration) {
        *self.lock() = (!duration.is_zero()).then(|| Instant::now() + duration);
    }

    pub fn is_open(&self) -> bool {
        self.lock().is_some_and(|until| Instant::now() < until)
    }

    /// Time left until it closes (zero when closed).
    pub fn remaining(&self) -> Duration {
        self.lock()
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A plain Option: a panic elsewhere cannot leave it inconsistent.
        self.until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counters exposed on `GET /$admin/stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub atom_requests: AtomicU64,
    pub token_requests: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub amqp_connections: AtomicU64,
    pub amqp_connections_refused: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_window_starts_and_ends() {
        let faults = Faults::default();
        assert!(!faults.refusing_connections());
        faults.refuse_connections_for(Duration::from_secs(60));
        assert!(faults.refusing_connections());
        faults.refuse_connections_for(Duration::ZERO);
        assert!(!faults.refusing_connections());
    }

    #[test]
    fn token_lifetime_override_round_trips() {
        let faults = Faults::default();
        assert_eq!(faults.token_lifetime_override(), None);
        faults.set_token_lifetime(Some(Duration::from_secs(30)));
        assert_eq!(
            faults.token_lifetime_override(),
            Some(Duration::from_secs(30))
        );
        faults.set_token_lifetime(None);
        assert_eq!(faults.token_lifetime_override(), None);
    }
}
