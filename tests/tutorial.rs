//! The tutorial and its failure modes, replayed with the real binary against a real `sblocal`.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;

fn env_with(base: &HashMap<String, String>, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut env = base.clone();
    for (k, v) in extra {
        env.insert((*k).to_string(), (*v).to_string());
    }
    env
}

fn produce(env: &HashMap<String, String>, count: u64) {
    let output = run_producer(env, count, &[]);
    let sent = log_lines(&output)
        .iter()
        .filter(|l| log_message(l) == format!("Sent {count} messages"))
        .count();
    assert_eq!(
        sent,
        1,
        "logs `Sent {count} messages`\n{}",
        describe(&output)
    );
}

/// The tutorial: the producer Job sends 100, KEDA starts 10 consumer Jobs with
/// MESSAGE_COUNT=10 (all at once); every message is received exactly once, the queue ends empty.
#[test]
fn tutorial_replay_producer_100_then_ten_consumers_of_ten() {
    let broker = Broker::start();
    let queue = broker.queue();
    produce(&broker.emulator_env, 100);
    assert_eq!(broker.counts(&queue), (100, 0));

    let consumers: Vec<_> = (0..10)
        .map(|_| {
            demo_command(
                &broker.emulator_env,
                &[
                    ("OPERATION_MODE", "consumer"),
                    ("MESSAGE_COUNT", "10"),
                    ("CONSUMER_IDLE_TIMEOUT", "20s"),
                    ("PREFETCH", "20"),
                ],
            )
            .spawn()
            .expect("spawn consumer")
        })
        .collect();
    let mut all_ids = Vec::new();
    for consumer in consumers {
        let output = wait_output(consumer);
        assert_success(&output);
        let ids = received_ids(&output);
        assert_eq!(
            ids.len(),
            10,
            "each Job takes exactly 10\n{}",
            describe(&output)
        );
        all_ids.extend(ids);
    }
    let unique: HashSet<_> = all_ids.iter().collect();
    assert_eq!(all_ids.len(), 100);
    assert_eq!(unique.len(), 100, "every message exactly once");
    assert_eq!(broker.counts(&queue), (0, 0), "queue empty");
}

/// Workload identity: the webhook's variables, a federated token exchanged at the token
/// endpoint over HTTPS (CA from SSL_CERT_FILE), AMQP over TLS. Access tokens live 4 s, so the
/// consumer refreshes its CBS token several times; the token file it started with expires
/// and is rewritten meanwhile, which works only if the file is read on every exchange.
#[test]
fn workload_identity_with_a_rotated_token_file() {
    let broker = Broker::start_with(&["--token-lifetime", "4"]);
    let queue = broker.queue();
    let env = broker.workload_env.clone();
    let token_file = std::path::PathBuf::from(&env["AZURE_FEDERATED_TOKEN_FILE"]);
    let subject = "system:serviceaccount:default:servicebusdemo";
    std::fs::write(&token_file, broker.mint_token(subject, 6)).expect("write token");

    produce(&env, 3);
    let mut consumer = demo_command(
        &env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("MESSAGE_COUNT", "6"),
            ("CONSUMER_IDLE_TIMEOUT", "60s"),
        ],
    )
    .spawn()
    .expect("spawn consumer");
    // The kubelet rotates the projected token; the first one expires soon after.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&token_file, broker.mint_token(subject, 3600)).expect("rotate token");
    // Past the first token's expiry and several access-token lifetimes.
    std::thread::sleep(Duration::from_secs(9));
    assert!(
        consumer.try_wait().expect("poll").is_none(),
        "consumer still waiting for the rest"
    );
    produce(&env, 3);
    let output = wait_output(consumer);
    assert_success(&output);
    assert_eq!(received_ids(&output).len(), 6, "{}", describe(&output));
    let chosen = log_lines(&output).iter().any(|l| {
        log_field(l, "credential").and_then(|c| c.as_str())
            == Some("workload identity (federated token file)")
    });
    assert!(
        chosen,
        "logs which credential was chosen\n{}",
        describe(&output)
    );
    assert_eq!(broker.counts(&queue), (0, 0));
}

/// SAS over TLS: the connection string form with the TLS host name is exercised by the
/// tutorial test (plain, emulator); here a failing message is abandoned, retried, and
/// dead-lettered after MAX_PROCESSING_ATTEMPTS, and it counts toward MESSAGE_COUNT.
#[test]
fn failing_message_is_abandoned_then_dead_lettered_after_bounded_attempts() {
    let broker = Broker::start();
    let queue = broker.queue();
    let env = env_with(&broker.emulator_env, &[("MESSAGE_BODY", "poison pill")]);
    produce(&env, 1);
    let output = run_demo(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("MESSAGE_COUNT", "1"),
            ("CONSUMER_IDLE_TIMEOUT", "10s"),
            ("PROCESSING_FAIL_MATCH", "poison"),
            ("MAX_PROCESSING_ATTEMPTS", "2"),
        ],
    );
    assert_success(&output);
    let messages: Vec<String> = log_lines(&output)
        .iter()
        .map(|l| log_message(l).to_string())
        .collect();
    let abandoned = messages
        .iter()
        .filter(|m| m.contains("abandoning for another attempt"))
        .count();
    let dead_lettered = messages
        .iter()
        .filter(|m| m.contains("dead-lettering"))
        .count();
    assert_eq!((abandoned, dead_lettered), (1, 1), "{}", describe(&output));
    assert_eq!(received_ids(&output).len(), 2, "delivered twice");
    assert_eq!(broker.counts(&queue), (0, 1), "in the dead-letter queue");

    // The dead-letter queue reads like a queue.
    let dlq = format!("{queue}/$DeadLetterQueue");
    let output = run_demo(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("AZURE_SERVICEBUS_QUEUE_NAME", dlq.as_str()),
            ("MESSAGE_COUNT", "1"),
            ("CONSUMER_IDLE_TIMEOUT", "10s"),
        ],
    );
    assert_success(&output);
    assert_eq!(received_ids(&output).len(), 1);
    assert_eq!(broker.counts(&queue), (0, 0));
}

/// SIGTERM while consuming: intake stops, the message in progress and prefetched ones are
/// abandoned (available again at once, not after their lock expires), exit code 0, nothing lost.
#[test]
fn sigterm_mid_consume_loses_nothing() {
    let broker = Broker::start();
    let queue = broker.queue();
    produce(&broker.emulator_env, 20);
    let mut consumer = demo_command(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("MESSAGE_COUNT", "20"),
            ("PREFETCH", "5"),
            ("PROCESSING_DELAY", "300ms"),
            ("CONSUMER_IDLE_TIMEOUT", "30s"),
        ],
    )
    .spawn()
    .expect("spawn consumer");
    // Wait until it has received three messages, then stop it.
    let logs = LogStream::attach(&mut consumer);
    let mut captured = String::new();
    let mut received = 0;
    while received < 3 {
        let Some(line) = logs.next_line(Duration::from_secs(60)) else {
            let _ = consumer.kill();
            panic!("consumer ended or stalled early:\n{captured}");
        };
        if line.contains("Received message: ") {
            received += 1;
        }
        captured.push_str(&line);
        captured.push('\n');
    }
    terminate(&consumer);
    for line in logs.rest() {
        captured.push_str(&line);
        captured.push('\n');
    }
    let status = consumer.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "exit 0 on SIGTERM\n{captured}");
    let completed: Vec<String> = captured
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| log_message(l) == "consumer finished")
        .filter_map(|l| {
            log_field(&l, "completed")
                .and_then(|c| c.as_u64())
                .map(|c| c.to_string())
        })
        .collect();
    assert_eq!(completed.len(), 1, "{captured}");
    let completed: u64 = completed[0].parse().expect("number");
    assert!(completed < 20, "stopped before the end\n{captured}");

    // Everything not completed is available right away (a 3s idle timeout is far shorter
    // than the queue's lock duration).
    let (active, dead) = broker.counts(&queue);
    assert_eq!((active, dead), (20 - completed, 0));
    let remaining = active.to_string();
    let output = run_demo(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("MESSAGE_COUNT", remaining.as_str()),
            ("CONSUMER_IDLE_TIMEOUT", "3s"),
            ("PREFETCH", "10"),
        ],
    );
    assert_success(&output);
    assert_eq!(
        received_ids(&output).len() as u64,
        active,
        "{}",
        describe(&output)
    );
    assert_eq!(broker.counts(&queue), (0, 0));
}

/// Connections dropped by the broker mid-run and a busy broker are retried transparently.
#[test]
fn dropped_connections_and_server_busy_are_retried() {
    let broker = Broker::start();
    let queue = broker.queue();
    let mut consumer = demo_command(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("MESSAGE_COUNT", "10"),
            ("CONSUMER_IDLE_TIMEOUT", "60s"),
        ],
    )
    .spawn()
    .expect("spawn consumer");
    let logs = LogStream::attach(&mut consumer);
    produce(&broker.emulator_env, 5);
    // Once the consumer has the first five, cut every connection and make sends fail.
    let mut lines = Vec::new();
    let mut received = 0;
    while received < 5 {
        let Some(line) = logs.next_line(Duration::from_secs(30)) else {
            let _ = consumer.kill();
            panic!("consumer stalled:\n{}", lines.join("\n"));
        };
        if line.contains("Received message: ") {
            received += 1;
        }
        lines.push(line);
    }
    broker.fault("/$admin/drop-connections");
    broker.fault("/$admin/server-busy?seconds=2");
    let env = env_with(&broker.emulator_env, &[("RETRY_MAX_ATTEMPTS", "10")]);
    let output = run_demo(
        &env,
        &[("OPERATION_MODE", "producer"), ("MESSAGE_COUNT", "5")],
    );
    assert_success(&output);
    let retried = log_lines(&output)
        .iter()
        .any(|l| log_message(l).contains("transiently"));
    assert!(
        retried,
        "the producer retried the busy broker\n{}",
        describe(&output)
    );

    lines.extend(logs.rest());
    let status = consumer.wait().expect("wait");
    let log = lines.join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    let ids: HashSet<String> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| log_message(l).starts_with("Received message: "))
        .filter_map(|l| {
            log_field(&l, "message_id")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(ids.len(), 10, "{log}");
    assert!(
        log.contains("reconnecting"),
        "the consumer reconnected\n{log}"
    );
    assert_eq!(broker.counts(&queue), (0, 0));
}

/// Unauthorized and not-found are fatal: exit 1 at once with a message that says so.
#[test]
fn fatal_errors_fail_fast_with_a_clear_message() {
    let broker = Broker::start();
    let good = broker.emulator_env["AZURE_SERVICEBUS_CONNECTION_STRING"].clone();
    let key_start = good.find("SharedAccessKey=").expect("key") + "SharedAccessKey=".len();
    let key_end = good[key_start..]
        .find(';')
        .map_or(good.len(), |i| key_start + i);
    let wrong = format!(
        "{}{}{}",
        &good[..key_start],
        "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkhIQ==",
        &good[key_end..]
    );
    let env = env_with(
        &broker.emulator_env,
        &[("AZURE_SERVICEBUS_CONNECTION_STRING", wrong.as_str())],
    );
    let output = run_demo(
        &env,
        &[("OPERATION_MODE", "producer"), ("MESSAGE_COUNT", "1")],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unauthorized"), "{stderr}");
    assert!(!stderr.contains("retrying"), "no retries for a wrong key");

    let output = run_demo(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "producer"),
            ("MESSAGE_COUNT", "1"),
            ("AZURE_SERVICEBUS_QUEUE_NAME", "no-such-queue"),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not found") || stderr.contains("unauthorized"),
        "{stderr}"
    );
}

/// Batches are packed to the link's maximum message size: 100 messages of 10 KB need several.
#[test]
fn large_messages_are_split_into_as_few_batches_as_fit() {
    let broker = Broker::start();
    let queue = broker.queue();
    let output = run_demo(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "producer"),
            ("MESSAGE_COUNT", "100"),
            ("MESSAGE_SIZE", "10000"),
        ],
    );
    assert_success(&output);
    let lines = log_lines(&output);
    let batches = lines
        .iter()
        .find(|l| log_message(l) == "every message accepted")
        .and_then(|l| log_field(l, "batches"))
        .and_then(|b| b.as_u64())
        .expect("sending line with batches");
    let max = lines
        .iter()
        .find(|l| log_message(l) == "sending")
        .and_then(|l| log_field(l, "max_message_size"))
        .and_then(|b| b.as_u64())
        .expect("max_message_size");
    // Each message is a little over 10 KB; the fewest batches is ceil(total / max).
    let fewest = (100 * 10_000u64).div_ceil(max);
    assert!(
        batches >= fewest && batches <= fewest + 1,
        "{batches} batches for max {max}"
    );
    assert!(lines.iter().any(|l| log_message(l) == "Sent 100 messages"));
    assert_eq!(broker.counts(&queue), (100, 0));
}

/// A projected token whose subject has no federated credential is refused by the token
/// endpoint; that is fatal (exit 1, no retry loop) and the Entra error is shown.
#[test]
fn workload_identity_without_a_matching_federated_credential_fails_fast() {
    let broker = Broker::start();
    let env = broker.workload_env.clone();
    let token_file = std::path::PathBuf::from(&env["AZURE_FEDERATED_TOKEN_FILE"]);
    let wrong = broker.mint_token("system:serviceaccount:default:someone-else", 3600);
    std::fs::write(&token_file, wrong).expect("write token");
    let output = run_demo(
        &env,
        &[("OPERATION_MODE", "producer"), ("MESSAGE_COUNT", "1")],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AADSTS70021"), "{stderr}");
    assert!(
        !stderr.contains("retrying"),
        "refusals are not retried: {stderr}"
    );
}

/// A token endpoint that cannot be reached is retried by our policy only (one connection
/// per attempt, not the identity SDK's own retries inside each), and the error says which
/// endpoint and setting to check and why it failed.
#[test]
fn an_unreachable_token_endpoint_is_named_and_retried_only_by_our_policy() {
    let broker = Broker::start();
    // Takes connections and closes them at once: every token request fails in transport.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let authority = format!("https://127.0.0.1:{port}/");
    let env = env_with(
        &broker.workload_env,
        &[
            ("AZURE_AUTHORITY_HOST", authority.as_str()),
            ("RETRY_MAX_ATTEMPTS", "3"),
        ],
    );
    let output = run_demo(
        &env,
        &[("OPERATION_MODE", "producer"), ("MESSAGE_COUNT", "1")],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let last = log_lines(&output).pop().expect("a last log line");
    let error = log_field(&last, "error")
        .and_then(|e| e.as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(&authority) && error.contains("AZURE_AUTHORITY_HOST"),
        "the error names the endpoint and its setting: {error}"
    );
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1 + 3,
        "one connection for the first attempt and one per retry (RETRY_MAX_ATTEMPTS)\n{}",
        describe(&output)
    );
}

/// A SAS connection string for a TLS endpoint (no UseDevelopmentEmulator): AMQP over TLS with
/// the broker's CA trusted through SSL_CERT_FILE; without it the certificate is refused with a
/// message that says where trust comes from, and that is not retried.
#[test]
fn sas_connection_string_over_tls_trusts_ssl_cert_file() {
    let broker = Broker::start();
    let queue = broker.queue();
    let plain = broker.emulator_env["AZURE_SERVICEBUS_CONNECTION_STRING"].clone();
    let tls_host = broker.workload_env["AZURE_SERVICEBUS_HOSTNAME"].clone();
    let rest = plain
        .split(';')
        .filter(|part| {
            !part.starts_with("Endpoint=") && !part.starts_with("UseDevelopmentEmulator")
        })
        .collect::<Vec<_>>()
        .join(";");
    let tls = format!("Endpoint=sb://{tls_host}/;{rest}");
    let ca = broker.workload_env["SSL_CERT_FILE"].clone();
    let env = env_with(
        &broker.emulator_env,
        &[
            ("AZURE_SERVICEBUS_CONNECTION_STRING", tls.as_str()),
            ("SSL_CERT_FILE", ca.as_str()),
        ],
    );
    produce(&env, 3);
    let output = run_demo(
        &env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("MESSAGE_COUNT", "3"),
            ("CONSUMER_IDLE_TIMEOUT", "10s"),
        ],
    );
    assert_success(&output);
    assert_eq!(received_ids(&output).len(), 3);
    assert_eq!(broker.counts(&queue), (0, 0));

    let mut untrusted = env.clone();
    untrusted.remove("SSL_CERT_FILE");
    let output = run_demo(
        &untrusted,
        &[("OPERATION_MODE", "producer"), ("MESSAGE_COUNT", "1")],
    );
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SSL_CERT_FILE"), "{stderr}");
    assert!(!stderr.contains("retrying"), "{stderr}");
}
