//! Queue definitions, read from the official emulator's `Config.json` format.
//!
//! The emulator's file is JSON with `//` and `/* */` comments (its shipped sample has them), so
//! comments are stripped before parsing. Only queues are served; topics, subscriptions and the
//! logging section are accepted and reported back so the caller can say what is not served.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

/// The emulator's queue when no configuration file is given.
pub const DEFAULT_QUEUE: &str = "queue.1";

/// What a configuration file asks for: the queues to serve and notes on what is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    pub queues: Vec<QueueSpec>,
    /// Human-readable notes on accepted but unserved parts (topics, logging, unsupported settings).
    pub not_served: Vec<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            queues: vec![QueueSpec::with_defaults(DEFAULT_QUEUE)],
            not_served: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid JSON")]
    Json(#[from] serde_json::Error),
    #[error("queue {queue}: RequiresSession=true is not supported (sblocal serves no sessions)")]
    SessionsUnsupported { queue: String },
    #[error("queue {queue}: {setting}={value:?} is not an ISO-8601 duration: {reason}")]
    Duration {
        queue: String,
        setting: &'static str,
        value: String,
        reason: String,
    },
    #[error("queue {queue}: {setting} must be greater than zero")]
    Zero {
        queue: String,
        setting: &'static str,
    },
    #[error("queue name {0:?} is invalid (1-260 characters: letters, digits, '.', '-', '_', '/')")]
    QueueName(String),
    #[error("queue {0} is defined more than once")]
    DuplicateQueue(String),
    #[error("the configuration defines no queues (UserConfig.Namespaces[].Queues)")]
    NoQueues,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FileRoot {
    user_config: UserConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserConfig {
    #[serde(default)]
    namespaces: Vec<NamespaceEntry>,
    #[serde(default)]
    logging: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NamespaceEntry {
    #[serde(default)]
    name: String,
    #[serde(default)]
    queues: Vec<QueueEntry>,
    #[serde(default)]
    topics: Vec<NamedEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NamedEntry {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct QueueEntry {
    name: String,
    #[serde(default)]
    properties: QueueProperties,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct QueueProperties {
    dead_lettering_on_message_expiration: Option<bool>,
    default_message_time_to_live: Option<String>,
    lock_duration: Option<String>,
    max_delivery_count: Option<u32>,
    requires_session: Option<bool>,
    requires_duplicate_detection: Option<bool>,
    forward_to: Option<String>,
    forward_dead_lettered_messages_to: Option<String>,
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text)
}

/// Parses the emulator's `Config.json` text (comments allowed).
pub fn parse(text: &str) -> Result<BrokerConfig, ConfigError> {
    let root: FileRoot = serde_json::from_str(&strip_json_comments(text))?;
    let mut config = BrokerConfig {
        queues: Vec::new(),
        not_served: Vec::new(),
    };
    for namespace in &root.user_config.namespaces {
        for topic in &namespace.topics {
            config.not_served.push(format!(
                "topic {} in namespace {} (topics are not served)",
                topic.name, namespace.name
            ));
        }
        for entry in &namespace.queues {
            let spec = queue_spec(entry, &mut config.not_served)?;
            if config
                .queues
                .iter()
                .any(|q| q.name.eq_ignore_ascii_case(&spec.name))
            {
                return Err(ConfigError::DuplicateQueue(spec.name));
            }
            config.queues.push(spec);
        }
    }
    if root.user_config.logging.is_some() {
        config
            .not_served
            .push("Logging section (sblocal logs to stderr, filtered by RUST_LOG)".to_string());
    }
    if config.queues.is_empty() {
        return Err(ConfigError::NoQueues);
    }
    Ok(config)
}

fn queue_spec(entry: &QueueEntry, notes: &mut Vec<String>) -> Result<QueueSpec, ConfigError> {
    let name = entry.name.clone();
    if !valid_queue_name(&name) {
        return Err(ConfigError::QueueName(name));
    }
    let props = &entry.properties;
    if props.requires_session == Some(true) {
        return Err(ConfigError::SessionsUnsupported { queue: name });
    }
    if props.requires_duplicate_detection == Some(true) {
        notes.push(format!(
            "queue {name}: RequiresDuplicateDetection (duplicates are not detected)"
        ));
    }
    for (setting, value) in [
        ("ForwardTo", &props.forward_to),
        (
            "ForwardDeadLetteredMessagesTo",
            &props.forward_dead_lettered_messages_to,
        ),
    ] {
        if value.as_deref().is_some_and(|v| !v.is_empty()) {
            notes.push(format!(
                "queue {name}: {setting} (forwarding is not served)"
            ));
        }
    }
    let mut spec = QueueSpec::with_defaults(name.clone());
    if let Some(value) = &props.lock_duration {
        spec.lock_duration = duration_setting(&name, "LockDuration", value)?;
    }
    if let Some(value) = &props.default_message_time_to_live {
        spec.default_message_ttl = duration_setting(&name, "DefaultMessageTimeToLive", value)?;
    }
    if let Some(count) = props.max_delivery_count {
        if count == 0 {
            return Err(ConfigError::Zero {
                queue: name,
                setting: "MaxDeliveryCount",
            });
        }
        spec.max_delivery_count = count;
    }
    if let Some(flag) = props.dead_lettering_on_message_expiration {
        spec.dead_lettering_on_message_expiration = flag;
    }
    Ok(spec)
}

fn duration_setting(
    queue: &str,
    setting: &'static str,
    value: &str,
) -> Result<Duration, ConfigError> {
    let duration = parse_iso8601_duration(value).map_err(|reason| ConfigError::Duration {
        queue: queue.to_string(),
        setting,
        value: value.to_string(),
        reason,
    })?;
    if duration.is_zero() {
        return Err(ConfigError::Zero {
            queue: queue.to_string(),
            setting,
        });
    }
    Ok(duration)
}

/// Service Bus entity names: letters, digits, periods, hyphens, underscores and slashes.
fn valid_queue_name(name: &str) -> bool {
    (1..=260).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains('$')
}

/// Parses an ISO-8601 duration as .NET's `XmlConvert` writes a `TimeSpan`: `P[nD][T[nH][nM][n.nS]]`,
/// weeks allowed. Years and months are refused: their length depends on a calendar date.
pub fn parse_iso8601_duration(text: &str) -> Result<Duration, String> {
    let rest = text
        .strip_prefix('P')
        .ok_or_else(|| "must start with 'P'".to_string())?;
    if rest.is_empty() {
        return Err("no components after 'P'".to_string());
    }
    let (date_part, time_part) = match rest.split_once('T') {
        Some((_, "")) => return Err("no components after 'T'".to_string()),
        Some((date, time)) => (date, Some(time)),
        None => (rest, None),
    };
    let mut total = 0f64;
    for (value, unit) in components(date_part)? {
        total += value
            * match unit {
                'W' => 7.0 * 86_400.0,
                'D' => 86_400.0,
                'Y' | 'M' => return Err("years and months have no fixed length".to_string()),
                other => return Err(format!("unknown date unit '{other}'")),
            };
    }
    for (value, unit) in components(time_part.unwrap_or(""))? {
        total += value
            * match unit {
                'H' => 3_600.0,
                'M' => 60.0,
                'S' => 1.0,
                other => return Err(format!("unknown time unit '{other}'")),
            };
    }
    Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}

/// Splits `1DT` style text into (number, unit) pairs; only the last number may be fractional
/// in practice, but any component is accepted with a fraction.
fn components(text: &str) -> Result<Vec<(f64, char)>, String> {
    let mut parts = Vec::new();
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() || c == '.' || c == ',' {
            number.push(if c == ',' { '.' } else { c });
        } else if c.is_ascii_alphabetic() {
            if number.is_empty() {
                return Err(format!("unit '{c}' has no number"));
            }
            let value: f64 = number
                .parse()
                .map_err(|_| format!("bad number {number:?}"))?;
            parts.push((value, c));
            number.clear();
        } else {
            return Err(format!("unexpected character '{c}'"));
        }
    }
    if !number.is_empty() {
        return Err(format!("number {number:?} has no unit"));
    }
    Ok(parts)
}

/// Removes `//` line comments and `/* */` block comments outside JSON strings.
fn strip_json_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => {
                    if let Some(escaped) = chars.next() {
                        out.push(escaped);
                    }
                }
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match (c, chars.peek()) {
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            ('/', Some('/')) => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut previous = '\0';
                for skipped in chars.by_ref() {
                    if previous == '*' && skipped == '/' {
                        break;
                    }
                    if skipped == '\n' {
                        out.push('\n');
                    }
                    previous = skipped;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_timespan_style() {
        assert_eq!(parse_iso8601_duration("PT1M"), Ok(Duration::from_secs(60)));
        assert_eq!(
            parse_iso8601_duration("PT1H"),
            Ok(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_iso8601_duration("P1D"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(parse_iso8601_duration("PT20S"), Ok(Duration::from_secs(20)));
        assert_eq!(
            parse_iso8601_duration("P1DT2H3M4.5S"),
            Ok(Duration::from_millis(93_784_500))
        );
        assert_eq!(
            parse_iso8601_duration("P2W"),
            Ok(Duration::from_secs(14 * 86_400))
        );
        // TimeSpan.MaxValue, what Service Bus reports for "never".
        assert!(parse_iso8601_duration("P10675199DT2H48M5.4775807S").is_ok());
    }

    #[test]
    fn bad_durations_are_refused() {
        for text in [
            "", "1M", "P", "PT", "P1Y", "P1M", "PT1X", "PTM", "PT5", "P1D5",
        ] {
            assert!(parse_iso8601_duration(text).is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn the_shared_emulator_config_parses() {
        let text = include_str!("../../../shared/emulator/Config.json");
        let config = parse(text).expect("emulator Config.json parses");
        assert_eq!(
            config.queues,
            vec![QueueSpec {
                name: "queue.1".to_string(),
                lock_duration: Duration::from_secs(60),
                max_delivery_count: 3,
                default_message_ttl: Duration::from_secs(3600),
                dead_lettering_on_message_expiration: false,
            }]
        );
        assert!(config.not_served.iter().any(|n| n.contains("topic.1")));
        assert!(config.not_served.iter().any(|n| n.contains("Logging")));
    }

    fn one_queue(properties: &str) -> String {
        format!(
            r#"{{"UserConfig":{{"Namespaces":[{{"Name":"ns","Queues":[{{"Name":"q","Properties":{{{properties}}}}}]}}]}}}}"#
        )
    }

    #[test]
    fn properties_override_defaults() {
        let config = parse(&one_queue(
            r#""LockDuration":"PT5S","MaxDeliveryCount":7,"DefaultMessageTimeToLive":"P1D","DeadLetteringOnMessageExpiration":true"#,
        ))
        .expect("parses");
        let queue = &config.queues[0];
        assert_eq!(queue.lock_duration, Duration::from_secs(5));
        assert_eq!(queue.max_delivery_count, 7);
        assert_eq!(queue.default_message_ttl, Duration::from_secs(86_400));
        assert!(queue.dead_lettering_on_message_expiration);
    }

    #[test]
    fn sessions_are_refused_by_name() {
        let err = parse(&one_queue(r#""RequiresSession":true"#)).unwrap_err();
        assert!(matches!(err, ConfigError::SessionsUnsupported { ref queue } if queue == "q"));
        assert!(err.to_string().contains("RequiresSession"));
    }

    #[test]
    fn bad_duration_names_queue_and_setting() {
        let err = parse(&one_queue(r#""LockDuration":"1 minute""#)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("queue q") && text.contains("LockDuration"),
            "{text}"
        );
    }

    #[test]
    fn zero_delivery_count_and_duplicates_are_refused() {
        assert!(matches!(
            parse(&one_queue(r#""MaxDeliveryCount":0"#)),
            Err(ConfigError::Zero { .. })
        ));
        let twice =
            r#"{"UserConfig":{"Namespaces":[{"Name":"ns","Queues":[{"Name":"a"},{"Name":"A"}]}]}}"#;
        assert!(matches!(parse(twice), Err(ConfigError::DuplicateQueue(_))));
        let none = r#"{"UserConfig":{"Namespaces":[{"Name":"ns","Queues":[]}]}}"#;
        assert!(matches!(parse(none), Err(ConfigError::NoQueues)));
    }

    #[test]
    fn comments_inside_strings_survive() {
        let text = r#"{"UserConfig":{/* block
          */"Namespaces":[{"Name":"n//s","Queues":[{"Name":"q"}]}]}} // tail"#;
        let config = parse(text).expect("parses");
        assert_eq!(config.queues[0].name, "q");
        assert_eq!(strip_json_comments(r#""a//b" // c"#).trim(), r#""a//b""#);
    }

    #[test]
    fn bad_queue_names_are_refused() {
        let text = r#"{"UserConfig":{"Namespaces":[{"Name":"ns","Queues":[{"Name":"a b"}]}]}}"#;
        assert!(matches!(parse(text), Err(ConfigError::QueueName(_))));
    }
}
