//! Every bad setting is refused before anything connects: exit code 2 and one line on stderr
//! that names the setting. The namespace used here does not exist, so a run that tried to
//! connect would fail differently (exit 1, after retries).

mod common;

use std::collections::HashMap;

use common::*;

const SAS: &str = "Endpoint=sb://localhost:1;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=c2VjcmV0;UseDevelopmentEmulator=true";

fn base() -> HashMap<String, String> {
    HashMap::from([
        ("OPERATION_MODE".to_string(), "producer".to_string()),
        (
            "AZURE_SERVICEBUS_QUEUE_NAME".to_string(),
            "orders".to_string(),
        ),
        (
            "AZURE_SERVICEBUS_CONNECTION_STRING".to_string(),
            SAS.to_string(),
        ),
        ("MESSAGE_COUNT".to_string(), "100".to_string()),
    ])
}

fn refused(overrides: &[(&str, Option<&str>)], setting: &str) {
    let mut env = base();
    for (key, value) in overrides {
        match value {
            Some(value) => env.insert((*key).to_string(), (*value).to_string()),
            None => env.remove(*key),
        };
    }
    let output = run_demo(&env, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{overrides:?} must exit 2\n{}",
        describe(&output)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(setting),
        "{overrides:?}: the line names {setting}: {stderr}"
    );
    assert!(
        !stderr.contains("c2VjcmV0"),
        "the key is never printed: {stderr}"
    );
}

#[test]
fn message_count_must_be_a_non_negative_number() {
    refused(&[("MESSAGE_COUNT", Some("abc"))], "MESSAGE_COUNT");
    refused(&[("MESSAGE_COUNT", Some("-1"))], "MESSAGE_COUNT");
    refused(&[("MESSAGE_COUNT", Some("1.5"))], "MESSAGE_COUNT");
}

#[test]
fn queue_name_is_required_and_valid() {
    refused(
        &[("AZURE_SERVICEBUS_QUEUE_NAME", None)],
        "AZURE_SERVICEBUS_QUEUE_NAME",
    );
    refused(
        &[("AZURE_SERVICEBUS_QUEUE_NAME", Some("bad queue!"))],
        "AZURE_SERVICEBUS_QUEUE_NAME",
    );
}

#[test]
fn hostname_must_not_have_a_scheme() {
    refused(
        &[
            ("AZURE_SERVICEBUS_CONNECTION_STRING", None),
            (
                "AZURE_SERVICEBUS_HOSTNAME",
                Some("https://mynamespace.servicebus.windows.net"),
            ),
        ],
        "AZURE_SERVICEBUS_HOSTNAME",
    );
}

#[test]
fn a_namespace_is_required() {
    refused(
        &[("AZURE_SERVICEBUS_CONNECTION_STRING", None)],
        "AZURE_SERVICEBUS_HOSTNAME",
    );
}

#[test]
fn malformed_connection_strings_are_refused() {
    for bad in [
        "not a connection string",
        "Endpoint=sb://localhost;SharedAccessKeyName=k",
        "Endpoint=https://localhost;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0",
    ] {
        refused(
            &[("AZURE_SERVICEBUS_CONNECTION_STRING", Some(bad))],
            "AZURE_SERVICEBUS_CONNECTION_STRING",
        );
    }
}

#[test]
fn unreadable_token_file_is_refused() {
    refused(
        &[
            ("AZURE_SERVICEBUS_CONNECTION_STRING", None),
            (
                "AZURE_SERVICEBUS_HOSTNAME",
                Some("ns.servicebus.windows.net"),
            ),
            (
                "AZURE_CLIENT_ID",
                Some("00000000-0000-0000-0000-000000000001"),
            ),
            (
                "AZURE_TENANT_ID",
                Some("00000000-0000-0000-0000-000000000002"),
            ),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                Some("/nonexistent/azure-identity-token"),
            ),
            (
                "AZURE_AUTHORITY_HOST",
                Some("https://login.microsoftonline.com/"),
            ),
        ],
        "AZURE_FEDERATED_TOKEN_FILE",
    );
}

#[test]
fn bad_mode_durations_and_formats_are_refused() {
    refused(&[("OPERATION_MODE", Some("sideways"))], "OPERATION_MODE");
    refused(&[("OPERATION_MODE", None)], "OPERATION_MODE");
    refused(
        &[
            ("OPERATION_MODE", Some("consumer")),
            ("CONSUMER_IDLE_TIMEOUT", Some("30")),
        ],
        "CONSUMER_IDLE_TIMEOUT",
    );
    refused(
        &[
            ("OPERATION_MODE", Some("consumer")),
            ("PROCESSING_DELAY", Some("a while")),
        ],
        "PROCESSING_DELAY",
    );
    refused(
        &[
            ("OPERATION_MODE", Some("consumer")),
            ("PREFETCH", Some("-3")),
        ],
        "PREFETCH",
    );
    refused(&[("LOG_FORMAT", Some("yaml"))], "LOG_FORMAT");
    refused(&[("METRICS_ADDR", Some("everywhere"))], "METRICS_ADDR");
    refused(&[("MESSAGE_SIZE", Some("5"))], "MESSAGE_SIZE");
    refused(&[("RUST_LOG", Some("[[["))], "RUST_LOG");
}

#[test]
fn unknown_flags_are_usage_errors() {
    let output = demo_command(&base(), &[])
        .arg("--no-such-flag")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn help_lists_settings_and_exits_zero() {
    let output = demo_command(&HashMap::new(), &[])
        .arg("--help")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for setting in [
        "OPERATION_MODE",
        "MESSAGE_COUNT",
        "AZURE_SERVICEBUS_QUEUE_NAME",
        "AZURE_SERVICEBUS_HOSTNAME",
        "AZURE_SERVICEBUS_CONNECTION_STRING",
        "CONSUMER_IDLE_TIMEOUT",
        "PREFETCH",
        "METRICS_ADDR",
        "SCALER_GRPC_ADDR",
    ] {
        assert!(help.contains(setting), "--help mentions {setting}");
    }
}
