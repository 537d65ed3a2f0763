//! Queue definitions, read from the official emulator's `Config.json` format.

use std::time::Duration;

/// One queue as the broker serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub default_message_ttl: Duration,
    pub dead_lettering_on_message_expiration: bool,
}

impl QueueSpec {
    /// The emulator's defaults for a queue named `name`.
    pub fn with_defaults(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 3,
            default_message_ttl: Duration::from_secs(3600),
            dead_lettering_on_message_expiration: false,
        }
    }
}
