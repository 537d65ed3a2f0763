//! Every bad setting is refused before anything connects: exit code 2 and one line on stderr
//! that names the setting. The namespace used here does not exist, so a run that tried to
//! connect would fail differently (exit 1, after retries).

mod common;

use std::collections::HashMap;
use std::time::Duration;

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
    // The consumer may read a dead-letter queue; the producer cannot send there.
    refused(
        &[(
            "AZURE_SERVICEBUS_QUEUE_NAME",
            Some("orders/$DeadLetterQueue"),
        )],
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

/// Settings to set (`Some`) or remove (`None`) on top of [`base`].
type Overrides<'a> = &'a [(&'a str, Option<&'a str>)];
type OwnedOverrides = Vec<(&'static str, Option<String>)>;

/// Values that parse as their type but are out of range, and combinations that cannot work.
/// Each is one more case of "exit 2, one line naming the setting".
#[test]
fn out_of_range_values_and_conflicts_are_refused() {
    let consumer = ("OPERATION_MODE", Some("consumer"));
    let cases: &[(Overrides, &str)] = &[
        // Adding this to a clock reading would overflow (a panic while processing).
        (
            &[consumer, ("PROCESSING_DELAY", Some("293000000000y"))],
            "PROCESSING_DELAY",
        ),
        (
            &[consumer, ("CONSUMER_IDLE_TIMEOUT", Some("0s"))],
            "CONSUMER_IDLE_TIMEOUT",
        ),
        (
            &[consumer, ("MAX_PROCESSING_ATTEMPTS", Some("0"))],
            "MAX_PROCESSING_ATTEMPTS",
        ),
        (&[("OPERATION_TIMEOUT", Some("0s"))], "OPERATION_TIMEOUT"),
        (
            &[
                ("RETRY_BASE_DELAY", Some("2s")),
                ("RETRY_MAX_DELAY", Some("1s")),
            ],
            "RETRY_MAX_DELAY",
        ),
        (
            &[("RETRY_MAX_ATTEMPTS", Some("many"))],
            "RETRY_MAX_ATTEMPTS",
        ),
        (&[("MESSAGE_SIZE", Some("200000000"))], "MESSAGE_SIZE"),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", Some("ftp://collector:4317"))],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            &[(
                "AZURE_SERVICEBUS_HOSTNAME",
                Some("ns.servicebus.windows.net"),
            )],
            "AZURE_SERVICEBUS_CONNECTION_STRING",
        ),
        (
            &[
                ("AZURE_SERVICEBUS_CONNECTION_STRING", None),
                (
                    "AZURE_SERVICEBUS_HOSTNAME",
                    Some("ns.servicebus.windows.net/orders"),
                ),
            ],
            "AZURE_SERVICEBUS_HOSTNAME",
        ),
        (
            &[
                ("AZURE_SERVICEBUS_CONNECTION_STRING", None),
                ("AZURE_SERVICEBUS_HOSTNAME", Some("ns:99999")),
            ],
            "AZURE_SERVICEBUS_HOSTNAME",
        ),
        // An all-digit name is an out-of-range IPv4 address to URL parsing; found by the
        // settings fuzzer, where it used to be blamed on the management endpoint.
        (
            &[
                ("OPERATION_MODE", Some("scaler")),
                ("AZURE_SERVICEBUS_CONNECTION_STRING", None),
                ("AZURE_SERVICEBUS_HOSTNAME", Some("4300000000")),
            ],
            "AZURE_SERVICEBUS_HOSTNAME",
        ),
    ];
    for (overrides, setting) in cases {
        refused(overrides, setting);
    }
    println!("{} out-of-range and conflict cases refused", cases.len());
}

#[test]
fn more_malformed_connection_strings_are_refused() {
    let cases = [
        "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0;UseDevelopmentEmulator=maybe",
        "Endpoint=sb://localhost/orders;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0",
        "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0;Colour=blue",
        "Endpoint=sb://localhost;SharedAccessSignature=sr=x&sig=c2VjcmV0",
        "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=",
        "Endpoint=sb://:5672;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0",
        // A mistyped separator: the part is reported, but not the short key in it.
        "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey c2VjcmV0",
    ];
    for bad in cases {
        refused(
            &[("AZURE_SERVICEBUS_CONNECTION_STRING", Some(bad))],
            "AZURE_SERVICEBUS_CONNECTION_STRING",
        );
    }
    println!("{} malformed connection strings refused", cases.len());
}

/// The workload-identity variables the webhook injects, pointing at `token_file`.
fn workload(token_file: &str) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("AZURE_SERVICEBUS_CONNECTION_STRING", None),
        (
            "AZURE_SERVICEBUS_HOSTNAME",
            Some("ns.servicebus.windows.net".to_string()),
        ),
        (
            "AZURE_CLIENT_ID",
            Some("00000000-0000-0000-0000-000000000001".to_string()),
        ),
        (
            "AZURE_TENANT_ID",
            Some("00000000-0000-0000-0000-000000000002".to_string()),
        ),
        ("AZURE_FEDERATED_TOKEN_FILE", Some(token_file.to_string())),
        (
            "AZURE_AUTHORITY_HOST",
            Some("https://login.microsoftonline.com/".to_string()),
        ),
    ]
}

fn refused_owned(overrides: &[(&str, Option<String>)], setting: &str) {
    let borrowed: Vec<(&str, Option<&str>)> =
        overrides.iter().map(|(k, v)| (*k, v.as_deref())).collect();
    refused(&borrowed, setting);
}

/// Token files that can never be exchanged, and a broken webhook injection, are refused
/// before any token request.
#[test]
fn bad_token_files_and_partial_webhook_variables_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("write");
    let good = dir.path().join("token");
    std::fs::write(&good, "header.payload.signature").expect("write");
    let good = good.to_str().expect("utf-8").to_string();
    let dir_path = dir.path().to_str().expect("utf-8").to_string();
    let empty = empty.to_str().expect("utf-8").to_string();

    let mut count = 0;
    // A directory opens fine on Linux but is no token.
    refused_owned(&workload(&dir_path), "AZURE_FEDERATED_TOKEN_FILE");
    count += 1;
    refused_owned(&workload(&empty), "AZURE_FEDERATED_TOKEN_FILE");
    count += 1;
    for (missing, setting) in [
        ("AZURE_CLIENT_ID", "AZURE_CLIENT_ID"),
        ("AZURE_TENANT_ID", "AZURE_TENANT_ID"),
    ] {
        let mut env = workload(&good);
        env.retain(|(k, _)| *k != missing);
        env.push((missing, None));
        refused_owned(&env, setting);
        count += 1;
    }
    let mut env = workload(&good);
    env.push((
        "AZURE_AUTHORITY_HOST",
        Some("http://login.microsoftonline.com/".to_string()),
    ));
    refused_owned(&env, "AZURE_AUTHORITY_HOST");
    count += 1;
    println!("{count} token-file and webhook cases refused");
}

#[test]
fn bad_scaler_settings_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir_path = dir.path().to_str().expect("utf-8").to_string();
    let scaler = ("OPERATION_MODE", Some("scaler".to_string()));
    // A real certificate and key, and a file that is neither: a wrong file in a Secret is a
    // configuration error naming its setting, not a gRPC server failing after start-up.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let file = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        Some(path.to_str().expect("utf-8").to_string())
    };
    let cert_file = file("scaler.pem", &cert.pem());
    let key_file = file("scaler.key", &key.serialize_pem());
    let garbage = file("garbage.pem", "this is not PEM\n");
    let key_as_cert = file("key-as-cert.pem", &key.serialize_pem());
    let cases: Vec<(OwnedOverrides, &str)> = vec![
        (
            vec![
                scaler.clone(),
                ("SCALER_QUEUES", Some("orders, bad queue!".to_string())),
            ],
            "SCALER_QUEUES",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_TLS_CLIENT_CA_FILE", Some(dir_path.clone())),
            ],
            "SCALER_TLS_CLIENT_CA_FILE",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_TLS_CERT_FILE", Some(dir_path.clone())),
                ("SCALER_TLS_KEY_FILE", Some(dir_path.clone())),
            ],
            "SCALER_TLS_CERT_FILE",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_TLS_CERT_FILE", garbage.clone()),
                ("SCALER_TLS_KEY_FILE", key_file.clone()),
            ],
            "SCALER_TLS_CERT_FILE",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_TLS_CERT_FILE", key_as_cert),
                ("SCALER_TLS_KEY_FILE", key_file.clone()),
            ],
            "SCALER_TLS_CERT_FILE",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_TLS_CERT_FILE", cert_file.clone()),
                ("SCALER_TLS_KEY_FILE", garbage.clone()),
            ],
            "SCALER_TLS_KEY_FILE",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_TLS_CERT_FILE", cert_file.clone()),
                ("SCALER_TLS_KEY_FILE", cert_file.clone()),
            ],
            "SCALER_TLS_KEY_FILE",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_TLS_CERT_FILE", cert_file),
                ("SCALER_TLS_KEY_FILE", key_file),
                ("SCALER_TLS_CLIENT_CA_FILE", garbage),
            ],
            "SCALER_TLS_CLIENT_CA_FILE",
        ),
        (
            vec![
                scaler.clone(),
                ("SCALER_MAX_STALENESS", Some("forever".to_string())),
            ],
            "SCALER_MAX_STALENESS",
        ),
        (
            vec![
                scaler.clone(),
                (
                    "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
                    Some("localhost:5300".to_string()),
                ),
            ],
            "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
        ),
        (
            vec![scaler, ("SCALER_GRPC_ADDR", Some("0.0.0.0".to_string()))],
            "SCALER_GRPC_ADDR",
        ),
    ];
    for (overrides, setting) in &cases {
        refused_owned(overrides, setting);
    }
    println!("{} scaler setting cases refused", cases.len());
}

mod proto {
    tonic::include_proto!("externalscaler");
}

/// Bad trigger metadata reaches a running scaler from KEDA, not from its environment: each
/// case is answered `INVALID_ARGUMENT` naming the field, by every RPC that takes metadata,
/// before anything asks the namespace.
#[tokio::test]
async fn bad_scaler_metadata_is_invalid_argument_naming_the_field() {
    use proto::external_scaler_client::ExternalScalerClient;
    use proto::{GetMetricsRequest, ScaledObjectRef};

    let mut env = base();
    env.remove("AZURE_SERVICEBUS_QUEUE_NAME");
    env.insert("OPERATION_MODE".into(), "scaler".into());
    let mut scaler = demo_command(&env, &[("SCALER_GRPC_ADDR", "127.0.0.1:0")])
        .spawn()
        .expect("spawn scaler");
    let logs = LogStream::attach(&mut scaler);
    let grpc_addr = loop {
        let Some(line) = logs.next_line(Duration::from_secs(30)) else {
            let _ = scaler.kill();
            panic!("scaler did not log its gRPC address");
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if log_message(&json).contains("externalscaler.ExternalScaler") {
            if let Some(addr) = log_field(&json, "addr").and_then(|a| a.as_str()) {
                break addr.to_string();
            }
        }
    };
    let mut client = ExternalScalerClient::connect(format!("http://{grpc_addr}"))
        .await
        .expect("connect to scaler");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "queueName"),
        (&[("queueName", "bad queue!")], "queueName"),
        (
            &[("queueName", "orders"), ("messageCount", "zero")],
            "messageCount",
        ),
        (
            &[("queueName", "orders"), ("messageCount", "0")],
            "messageCount",
        ),
        (
            &[("queueName", "orders"), ("messageCount", "1.5")],
            "messageCount",
        ),
        (
            &[("queueName", "orders"), ("activationMessageCount", "-3")],
            "activationMessageCount",
        ),
        (
            &[("queueName", "orders"), ("namespace", "fabrikam")],
            "namespace",
        ),
    ];
    for (pairs, field) in cases {
        let reference = ScaledObjectRef {
            name: "consumer".into(),
            namespace: "default".into(),
            scaler_metadata: pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        };
        let statuses = [
            client
                .is_active(reference.clone())
                .await
                .expect_err("IsActive"),
            client
                .get_metric_spec(reference.clone())
                .await
                .expect_err("GetMetricSpec"),
            client
                .get_metrics(GetMetricsRequest {
                    scaled_object_ref: Some(reference.clone()),
                    metric_name: String::new(),
                })
                .await
                .expect_err("GetMetrics"),
        ];
        for status in statuses {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{pairs:?}");
            assert!(
                status.message().contains(field),
                "{pairs:?}: {}",
                status.message()
            );
        }
    }
    println!("{} scaler metadata cases refused", cases.len());
    terminate(&scaler);
    let status = scaler.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// A connection string scoped to one queue (`EntityPath`) names the queue when
/// AZURE_SERVICEBUS_QUEUE_NAME is not set; when both are set they must name the same queue.
#[test]
fn queue_name_must_agree_with_the_connection_strings_entity_path() {
    let scoped = format!("{SAS};EntityPath=orders");
    for other in ["payments", "payments/$DeadLetterQueue"] {
        refused(
            &[
                ("AZURE_SERVICEBUS_CONNECTION_STRING", Some(scoped.as_str())),
                ("AZURE_SERVICEBUS_QUEUE_NAME", Some(other)),
            ],
            "AZURE_SERVICEBUS_QUEUE_NAME",
        );
    }
    let bad_entity = format!("{SAS};EntityPath=bad queue!");
    refused(
        &[
            (
                "AZURE_SERVICEBUS_CONNECTION_STRING",
                Some(bad_entity.as_str()),
            ),
            ("AZURE_SERVICEBUS_QUEUE_NAME", None),
        ],
        "AZURE_SERVICEBUS_CONNECTION_STRING",
    );
}

#[test]
fn entity_path_is_the_queue_when_no_queue_name_is_set() {
    let broker = Broker::start();
    let queue = broker.queue();
    let mut env = broker.emulator_env.clone();
    env.remove("AZURE_SERVICEBUS_QUEUE_NAME");
    let scoped = format!(
        "{};EntityPath={queue}",
        env["AZURE_SERVICEBUS_CONNECTION_STRING"]
    );
    env.insert("AZURE_SERVICEBUS_CONNECTION_STRING".into(), scoped);
    let output = run_demo(
        &env,
        &[("OPERATION_MODE", "producer"), ("MESSAGE_COUNT", "3")],
    );
    assert_success(&output);
    assert_eq!(broker.counts(&queue), (3, 0), "{}", describe(&output));
}
