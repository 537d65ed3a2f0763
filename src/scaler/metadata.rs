//! The trigger metadata KEDA passes in `ScaledObjectRef.scalerMetadata`.
//!
//! Names and defaults follow KEDA's built-in `azure-servicebus` trigger, so a ScaledJob can
//! switch between it and this scaler by changing only `type` and `scalerAddress`.

use std::collections::HashMap;

use crate::servicebus::admin::validate_queue_name;

/// `messageCount` when not given: KEDA's own default for Service Bus.
pub const DEFAULT_TARGET_MESSAGES: u64 = 5;
/// `activationMessageCount` when not given.
pub const DEFAULT_ACTIVATION_MESSAGES: u64 = 0;
/// `endpointSuffix` when not given (public cloud).
pub const DEFAULT_ENDPOINT_SUFFIX: &str = "servicebus.windows.net";

/// Validated trigger metadata for one queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TriggerMetadata {
    pub queue: String,
    /// Scale so each replica gets this many messages (`messageCount`), > 0.
    pub target_messages: u64,
    /// Active only when the queue holds more than this (`activationMessageCount`).
    pub activation_messages: u64,
}

impl TriggerMetadata {
    /// The metric name reported by `GetMetricSpec`, derived from the queue like KEDA's
    /// built-in trigger does (`azure-servicebus-<queue>`, normalised for Kubernetes).
    pub fn metric_name(&self) -> String {
        let normalized: String = self
            .queue
            .chars()
            .map(|c| match c {
                '/' | '.' | '_' | ':' => '-',
                other => other.to_ascii_lowercase(),
            })
            .collect();
        format!("azure-servicebus-{normalized}")
    }

    /// `IsActive`: the queue holds more than the activation threshold.
    pub fn is_active(&self, active_messages: u64) -> bool {
        active_messages > self.activation_messages
    }
}

/// Bad metadata; the message names the field, and becomes `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata field {field} is required")]
    Missing { field: &'static str },
    #[error("metadata field {field} is invalid ({value:?}): {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// Parse and validate `scalerMetadata` against the namespace this scaler holds
/// credentials for (`namespace_host`, e.g. `contoso.servicebus.windows.net`).
pub fn parse(
    metadata: &HashMap<String, String>,
    namespace_host: &str,
) -> Result<TriggerMetadata, MetadataError> {
    let queue =
        lookup(metadata, "queueName").ok_or(MetadataError::Missing { field: "queueName" })?;
    validate_queue_name(queue).map_err(|err| MetadataError::Invalid {
        field: "queueName",
        value: queue.to_owned(),
        reason: err.to_string(),
    })?;
    check_namespace(metadata, namespace_host)?;
    let target_messages = count(metadata, "messageCount", DEFAULT_TARGET_MESSAGES)?;
    if target_messages == 0 {
        return Err(MetadataError::Invalid {
            field: "messageCount",
            value: "0".to_owned(),
            reason: "must be greater than 0".to_owned(),
        });
    }
    let activation_messages = count(
        metadata,
        "activationMessageCount",
        DEFAULT_ACTIVATION_MESSAGES,
    )?;
    Ok(TriggerMetadata {
        queue: queue.to_owned(),
        target_messages,
        activation_messages,
    })
}

/// A value by name; KEDA passes `<name>FromEnv` keys with the resolved value, so those count
/// too. Blank values are treated as absent.
fn lookup<'a>(metadata: &'a HashMap<String, String>, field: &str) -> Option<&'a str> {
    metadata
        .get(field)
        .or_else(|| metadata.get(&format!("{field}FromEnv")))
        .map(|value| value.trim())
        .filter(|value| !value.is_empty())
}

fn count(
    metadata: &HashMap<String, String>,
    field: &'static str,
    default: u64,
) -> Result<u64, MetadataError> {
    match lookup(metadata, field) {
        None => Ok(default),
        Some(value) => value.parse::<u64>().map_err(|_| MetadataError::Invalid {
            field,
            value: value.to_owned(),
            reason: "must be a non-negative integer".to_owned(),
        }),
    }
}

/// `namespace` (+ `endpointSuffix`) is optional; when given it must name the namespace
/// this scaler has credentials for, since it has no others.
fn check_namespace(
    metadata: &HashMap<String, String>,
    namespace_host: &str,
) -> Result<(), MetadataError> {
    let Some(namespace) = lookup(metadata, "namespace") else {
        if lookup(metadata, "endpointSuffix").is_some() {
            return Err(MetadataError::Invalid {
                field: "endpointSuffix",
                value: lookup(metadata, "endpointSuffix")
                    .unwrap_or_default()
                    .to_owned(),
                reason: "given without namespace".to_owned(),
            });
        }
        return Ok(());
    };
    let suffix = lookup(metadata, "endpointSuffix").unwrap_or(DEFAULT_ENDPOINT_SUFFIX);
    let requested_host = format!("{namespace}.{suffix}");
    // A bare host (e.g. `localhost` for a local broker) is accepted as the namespace too.
    let matches = requested_host.eq_ignore_ascii_case(namespace_host)
        || namespace.eq_ignore_ascii_case(namespace_host);
    if matches {
        Ok(())
    } else {
        Err(MetadataError::Invalid {
            field: "namespace",
            value: namespace.to_owned(),
            reason: format!(
                "this scaler only holds credentials for {namespace_host}, not {requested_host}"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "contoso.servicebus.windows.net";

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_follow_keda_azure_servicebus() {
        let parsed = parse(&meta(&[("queueName", "orders")]), HOST).expect("valid");
        assert_eq!(
            parsed,
            TriggerMetadata {
                queue: "orders".to_owned(),
                target_messages: 5,
                activation_messages: 0,
            }
        );
        assert_eq!(parsed.metric_name(), "azure-servicebus-orders");
        assert!(!parsed.is_active(0));
        assert!(parsed.is_active(1));
    }

    #[test]
    fn explicit_values_and_namespace_are_accepted() {
        let parsed = parse(
            &meta(&[
                ("queueName", "orders"),
                ("namespace", "contoso"),
                ("messageCount", "10"),
                ("activationMessageCount", "3"),
            ]),
            HOST,
        )
        .expect("valid");
        assert_eq!(parsed.target_messages, 10);
        assert_eq!(parsed.activation_messages, 3);
        assert!(!parsed.is_active(3));
        assert!(parsed.is_active(4));

        let sovereign = parse(
            &meta(&[
                ("queueName", "orders"),
                ("namespace", "contoso"),
                ("endpointSuffix", "servicebus.chinacloudapi.cn"),
            ]),
            "contoso.servicebus.chinacloudapi.cn",
        );
        assert!(sovereign.is_ok());
    }

    #[test]
    fn from_env_keys_resolved_by_keda_are_used() {
        let parsed = parse(
            &meta(&[("queueNameFromEnv", "orders"), ("messageCountFromEnv", "7")]),
            HOST,
        )
        .expect("valid");
        assert_eq!(parsed.queue, "orders");
        assert_eq!(parsed.target_messages, 7);
    }

    fn field_of(err: MetadataError) -> &'static str {
        match err {
            MetadataError::Missing { field } | MetadataError::Invalid { field, .. } => field,
        }
    }

    #[test]
    fn bad_metadata_names_the_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "queueName"),
            (&[("queueName", "  ")], "queueName"),
            (&[("queueName", "../x")], "queueName"),
            (&[("queueName", "q"), ("messageCount", "0")], "messageCount"),
            (
                &[("queueName", "q"), ("messageCount", "ten")],
                "messageCount",
            ),
            (
                &[("queueName", "q"), ("messageCount", "-1")],
                "messageCount",
            ),
            (
                &[("queueName", "q"), ("messageCount", "2.5")],
                "messageCount",
            ),
            (
                &[("queueName", "q"), ("activationMessageCount", "x")],
                "activationMessageCount",
            ),
            (
                &[("queueName", "q"), ("namespace", "fabrikam")],
                "namespace",
            ),
            (
                &[
                    ("queueName", "q"),
                    ("namespace", "contoso"),
                    ("endpointSuffix", "servicebus.usgovcloudapi.net"),
                ],
                "namespace",
            ),
            (
                &[
                    ("queueName", "q"),
                    ("endpointSuffix", "servicebus.windows.net"),
                ],
                "endpointSuffix",
            ),
        ];
        for (pairs, field) in cases {
            let err = parse(&meta(pairs), HOST).expect_err("invalid");
            assert!(err.to_string().contains(field), "{err} should name {field}");
            assert_eq!(field_of(err), *field, "{pairs:?}");
        }
    }

    #[test]
    fn metric_names_are_kubernetes_friendly() {
        let parsed = parse(&meta(&[("queueName", "Team/Orders.v2")]), HOST).expect("valid");
        assert_eq!(parsed.metric_name(), "azure-servicebus-team-orders-v2");
    }
}
