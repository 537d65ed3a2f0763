//! Reliability under the broker's fault switches, with real processes against a real `sblocal`:
//! dropped connections mid-produce and mid-consume, a refusal window, a busy broker, short-lived
//! access tokens, an unanswered `$cbs`, and SIGTERM in the middle of a producer run.
//!
//! Durations that make a run slow are configurable (defaults are short but still exercise
//! several retries): `RELIABILITY_MESSAGES`, `RELIABILITY_LOCK_DURATION` (ISO-8601),
//! `RELIABILITY_REFUSE_SECONDS`, `RELIABILITY_BUSY_SECONDS`,
//! `RELIABILITY_TOKEN_LIFETIME_SECONDS`, `RELIABILITY_TOKEN_LIFETIMES`,
//! `RELIABILITY_CBS_TOKEN_LIFETIME_SECONDS`. No assertion depends on
//! how fast this machine is: counts are bounded by the retry policy's arithmetic, and waits only
//! ever make a run longer.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

/// Retry policy given to every process here (the same as `demo_command`'s defaults, spelled
/// out because the assertions below do arithmetic with it).
const BASE_DELAY_MS: u64 = 100;
const MAX_DELAY_MS: u64 = 1000;
/// Upper bound for a whole scenario (a safety net, not an assertion about speed).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_text(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn retry_env(max_attempts: u64) -> Vec<(String, String)> {
    vec![
        ("RETRY_MAX_ATTEMPTS".into(), max_attempts.to_string()),
        ("RETRY_BASE_DELAY".into(), format!("{BASE_DELAY_MS}ms")),
        ("RETRY_MAX_DELAY".into(), format!("{MAX_DELAY_MS}ms")),
    ]
}

fn with(base: &HashMap<String, String>, extra: &[(String, String)]) -> HashMap<String, String> {
    let mut env = base.clone();
    env.extend(extra.iter().cloned());
    env
}

/// A broker with one queue `rel` whose lock is short (so messages locked by a dropped link
/// return soon) and whose delivery limit is high (so repeated drops never dead-letter).
fn broker_with_short_locks() -> Broker {
    let lock = env_text("RELIABILITY_LOCK_DURATION", "PT3S");
    Broker::with_queues(&[(
        "rel",
        serde_json::json!({ "LockDuration": lock, "MaxDeliveryCount": 50 }),
    )])
}

/// Everything a child printed, as it came, plus the JSON lines parsed.
struct Captured {
    lines: Vec<String>,
}

impl Captured {
    fn new() -> Self {
        Self { lines: Vec::new() }
    }

    fn push(&mut self, line: String) {
        self.lines.push(line);
    }

    fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// Keep the log for a look afterwards when `RELIABILITY_LOG_DIR` is set.
    fn save(&self, name: &str) {
        if let Ok(dir) = std::env::var("RELIABILITY_LOG_DIR") {
            let path = std::path::Path::new(&dir).join(format!("{name}.log"));
            std::fs::write(&path, self.text()).expect("write log");
        }
    }

    fn json(&self) -> Vec<serde_json::Value> {
        self.lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn messages_starting_with(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.json()
            .into_iter()
            .filter(|l| log_message(l).starts_with(prefix))
            .collect()
    }

    fn received_ids(&self) -> Vec<String> {
        self.messages_starting_with("Received message: ")
            .iter()
            .filter_map(|l| log_field(l, "message_id").and_then(|v| v.as_str()))
            .map(str::to_string)
            .collect()
    }

    /// The cumulative counts of the producer's `Sent N messages` lines.
    fn sent_progress(&self) -> Vec<u64> {
        self.messages_starting_with("Sent ")
            .iter()
            .filter_map(|l| {
                log_message(l)
                    .strip_prefix("Sent ")?
                    .strip_suffix(" messages")?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// The error of the run's last line when that line says it failed.
    fn final_error(&self) -> Option<String> {
        let last = self.json().pop()?;
        (log_message(&last) == "failed").then(|| error_of(&last).to_string())
    }

    fn metrics_addr(&self) -> Option<String> {
        self.json()
            .iter()
            .find(|l| log_message(l) == "metrics address")
            .and_then(|l| log_field(l, "metrics_addr"))
            .and_then(|a| a.as_str())
            .map(str::to_string)
    }
}

/// A consumer that runs until stopped (`MESSAGE_COUNT=0`, the worker of a Deployment).
fn spawn_worker(env: &HashMap<String, String>) -> (Child, LogStream) {
    spawn_demo(
        env,
        &[("OPERATION_MODE", "consumer"), ("MESSAGE_COUNT", "0")],
    )
}

/// The `error` field of a log line ("" without one).
fn error_of(line: &serde_json::Value) -> &str {
    log_field(line, "error")
        .and_then(|e| e.as_str())
        .unwrap_or_default()
}

/// Read lines until `done` says so; panics (killing the child) when nothing comes for a while.
fn read_until(
    child: &mut Child,
    logs: &LogStream,
    captured: &mut Captured,
    mut done: impl FnMut(&str) -> bool,
) {
    let started = Instant::now();
    loop {
        let Some(line) = logs.next_line(Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("child stalled or ended early:\n{}", captured.text());
        };
        let finished = done(&line);
        captured.push(line);
        if finished {
            return;
        }
        if started.elapsed() > SCENARIO_TIMEOUT {
            let _ = child.kill();
            panic!("scenario did not finish:\n{}", captured.text());
        }
    }
}

/// The largest increase between consecutive running totals (from 0): the biggest batch sent.
fn largest_step(totals: &[u64]) -> u64 {
    totals
        .iter()
        .scan(0, |previous, &total| {
            let size = total - *previous;
            *previous = total;
            Some(size)
        })
        .max()
        .unwrap_or(0)
}

/// Waits for a child expected to end by itself, reading its log; kills it and fails the test
/// when it is still running after `limit`.
fn exit_within(
    mut child: Child,
    logs: LogStream,
    captured: &mut Captured,
    limit: Duration,
) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match logs.next_line(left) {
            Some(line) => captured.push(line),
            None => break,
        }
    }
    if child.try_wait().expect("wait").is_none() && Instant::now() >= deadline {
        let _ = child.kill();
        panic!("still running after {limit:?}:\n{}", captured.text());
    }
    finish(child, logs, captured)
}

fn finish(mut child: Child, logs: LogStream, captured: &mut Captured) -> Option<i32> {
    for line in logs.rest() {
        captured.push(line);
    }
    child.wait().expect("wait").code()
}

/// `GET path` on a metrics address.
/// Send `count` messages with a producer run, then read the consumer's log until it has
/// received that many more.
fn produce_and_receive(
    env: &HashMap<String, String>,
    consumer: &mut Child,
    logs: &LogStream,
    captured: &mut Captured,
    count: u64,
) {
    run_producer(env, count, &[]);
    let mut received = 0;
    read_until(consumer, logs, captured, |line| {
        if line.contains("Received message: ") {
            received += 1;
        }
        received == count
    });
}

/// AMQP connections the broker has accepted so far.
fn amqp_connections(broker: &Broker) -> u64 {
    broker.stats()["amqp_connections"]
        .as_u64()
        .expect("connections")
}

fn http_get(addr: &str, path: &str) -> String {
    let (status, body) = metrics_get(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The value of the first sample whose line starts with `prefix` (name plus labels).
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Seconds since midnight UTC of a JSON log line's RFC 3339 `timestamp`.
fn timestamp_seconds(line: &serde_json::Value) -> f64 {
    let stamp = line["timestamp"].as_str().expect("timestamp field");
    let time = stamp
        .split('T')
        .nth(1)
        .expect("RFC 3339 time")
        .trim_end_matches('Z');
    let mut parts = time.split(':');
    let mut next = || -> f64 { parts.next().and_then(|p| p.parse().ok()).expect("h:m:s") };
    let (h, m, s) = (next(), next(), next());
    h * 3600.0 + m * 60.0 + s
}

/// Seconds from `a` to `b` (log lines of one run; a run never lasts a day).
fn gap_seconds(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let gap = timestamp_seconds(b) - timestamp_seconds(a);
    if gap < 0.0 {
        gap + 86_400.0
    } else {
        gap
    }
}

/// The retry policy's bounds for retry number `attempt` (1-based): `[ceiling/2, ceiling]`.
fn policy_bounds_ms(attempt: u64) -> (u64, u64) {
    let ceiling = (BASE_DELAY_MS << (attempt.saturating_sub(1)).min(20)).min(MAX_DELAY_MS);
    (ceiling / 2, ceiling)
}

/// The most retries that fit in `window_ms` if every wait is the policy's shortest one
/// (a busy loop would exceed it; a slow machine only stays further below it).
fn max_retries_within(window_ms: u64) -> u64 {
    let mut waited = 0;
    let mut retries = 0;
    loop {
        let (shortest, _) = policy_bounds_ms(retries + 1);
        if waited + shortest > window_ms {
            return retries + 1;
        }
        waited += shortest;
        retries += 1;
    }
}

/// Check each retry line against the policy: its delay lies within the bounds for its
/// attempt, and the next attempt was not made before that delay had passed.
fn assert_backoff_followed(retries: &[serde_json::Value], next_attempts: &[serde_json::Value]) {
    for (i, line) in retries.iter().enumerate() {
        let attempt = log_field(line, "attempt")
            .and_then(|a| a.as_u64())
            .expect("attempt field");
        let delay = log_field(line, "delay_ms")
            .and_then(|d| d.as_u64())
            .expect("delay_ms field");
        let (low, high) = policy_bounds_ms(attempt);
        assert!(
            (low..=high).contains(&delay),
            "retry {attempt}: delay {delay} ms outside the policy's [{low}, {high}] ms"
        );
        if let Some(next) = next_attempts.get(i) {
            // Log timestamps have microsecond precision; allow 1 ms of rounding.
            let gap_ms = gap_seconds(line, next) * 1000.0;
            assert!(
                gap_ms + 1.0 >= delay as f64,
                "retry {attempt}: next attempt after {gap_ms:.1} ms, before its {delay} ms delay"
            );
        }
    }
}

fn assert_no_timeouts(captured: &Captured) {
    let timeouts: Vec<String> = captured
        .json()
        .iter()
        .filter_map(|l| log_field(l, "error").and_then(|e| e.as_str()))
        .filter(|e| e.contains("timed out"))
        .map(str::to_string)
        .collect();
    assert!(
        timeouts.is_empty(),
        "waited for a dead connection: {timeouts:?}"
    );
}

/// The broker drops every connection several times while the producer sends and again
/// while a consumer drains: both runs complete, no message is lost, and duplicates are only
/// messages that were in flight at a drop.
#[test]
fn dropped_connections_mid_produce_and_mid_consume_lose_nothing() {
    let broker = broker_with_short_locks();
    let messages = env_number("RELIABILITY_MESSAGES", 2000);
    let env = with(&broker.emulator_env, &retry_env(20));

    // Produce: 8 KB bodies fill about 30 messages per 256 KB batch, so the run has many
    // batches; drop every connection right after the 2nd, 10th and 20th batch is accepted.
    let count = messages.to_string();
    let (mut producer, logs) = spawn_demo(
        &env,
        &[
            ("OPERATION_MODE", "producer"),
            ("AZURE_SERVICEBUS_QUEUE_NAME", "rel"),
            ("MESSAGE_COUNT", count.as_str()),
            ("MESSAGE_SIZE", "8192"),
        ],
    );
    let mut produced = Captured::new();
    let drop_after_batches = [2usize, 10, 20];
    let mut batches = 0;
    let mut producer_drops = 0;
    read_until(&mut producer, &logs, &mut produced, |line| {
        if line.contains("\"Sent ") {
            batches += 1;
            if drop_after_batches.contains(&batches) {
                broker.fault("/$admin/drop-connections");
                producer_drops += 1;
            }
        }
        batches >= *drop_after_batches.last().unwrap_or(&0) || line.contains("every message")
    });
    let code = finish(producer, logs, &mut produced);
    produced.save("drops-producer");
    assert_eq!(code, Some(0), "producer completes\n{}", produced.text());
    let progress = produced.sent_progress();
    assert_eq!(progress.last(), Some(&messages), "{}", produced.text());
    let largest_batch = largest_step(&progress);
    let producer_reconnects = produced
        .messages_starting_with("send failed transiently")
        .len() as u64;
    // Batches that were in flight behind the failed one are sent again as well.
    let producer_resends = producer_reconnects
        + produced
            .messages_starting_with("resending a batch that was in flight")
            .len() as u64;
    assert!(
        producer_reconnects >= 1,
        "a drop hit the producer mid-run ({producer_drops} drops)\n{}",
        produced.text()
    );
    // A dropped connection is noticed as such, not waited out until the operation timeout.
    assert_no_timeouts(&produced);
    let (queued, dead) = broker.counts("rel");
    assert_eq!(dead, 0);
    assert!(queued >= messages, "nothing lost: {queued} of {messages}");
    let producer_duplicates = queued - messages;
    assert!(
        producer_duplicates <= producer_resends * largest_batch,
        "duplicates ({producer_duplicates}) only from batches in flight at a drop \
         ({producer_resends} resends of at most {largest_batch})"
    );

    // Consume with prefetch, a little work per message, and drops at three points.
    let prefetch = 20u64;
    let prefetch_text = prefetch.to_string();
    let (mut consumer, logs) = spawn_demo(
        &env,
        &[
            ("OPERATION_MODE", "consumer"),
            ("AZURE_SERVICEBUS_QUEUE_NAME", "rel"),
            ("MESSAGE_COUNT", "0"),
            ("PREFETCH", prefetch_text.as_str()),
            ("PROCESSING_DELAY", "2ms"),
        ],
    );
    let mut consumed = Captured::new();
    let drop_points = [queued / 10, queued / 3, queued * 2 / 3];
    let mut received = 0;
    let mut consumer_drops = 0u64;
    let mut last_check = Instant::now();
    let started = Instant::now();
    loop {
        if let Some(line) = logs.next_line(Duration::from_millis(100)) {
            if line.contains("Received message: ") {
                received += 1;
                if drop_points.contains(&received) {
                    broker.fault("/$admin/drop-connections");
                    consumer_drops += 1;
                }
            }
            consumed.push(line);
        }
        // The queue counts locked messages as active: (0, 0) means every message completed.
        if last_check.elapsed() > Duration::from_millis(250) {
            last_check = Instant::now();
            if broker.counts("rel") == (0, 0) {
                break;
            }
        }
        if started.elapsed() > SCENARIO_TIMEOUT {
            let _ = consumer.kill();
            panic!(
                "queue not drained: {:?}\n{}",
                broker.counts("rel"),
                consumed.text()
            );
        }
    }
    terminate(&consumer);
    let code = finish(consumer, logs, &mut consumed);
    consumed.save("drops-consumer");
    assert_eq!(code, Some(0), "{}", consumed.text());
    let ids = consumed.received_ids();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        unique.len() as u64,
        messages,
        "every message id produced was consumed"
    );
    let consumer_duplicates = ids.len() as u64 - messages;
    let consumer_reconnects = consumed
        .messages_starting_with("connection lost; reconnecting")
        .len() as u64;
    assert_eq!(consumer_drops, 3, "all three drops happened mid-consume");
    assert_no_timeouts(&consumed);
    assert!(consumer_reconnects >= 1, "{}", consumed.text());
    // In flight at a drop: the message being processed and what was prefetched.
    assert!(
        consumer_duplicates <= consumer_drops * (prefetch + 1),
        "{consumer_duplicates} duplicates from {consumer_drops} drops"
    );
    assert_eq!(broker.counts("rel"), (0, 0));
    println!(
        "drops: producer {producer_drops} (reconnects {producer_reconnects}, \
         duplicates {producer_duplicates}, largest batch {largest_batch}); \
         consumer {consumer_drops} (reconnects {consumer_reconnects}, \
         duplicates {consumer_duplicates}, prefetch {prefetch}); messages {messages}"
    );
}

/// The broker refuses connections for a while: the consumer backs off with jitter, connects
/// once the window ends, and its reconnect counter on /metrics equals the connections the
/// broker refused.
#[test]
fn refused_connections_are_retried_with_jittered_backoff_and_counted() {
    let broker = Broker::start();
    let queue = broker.queue();
    let window = env_number("RELIABILITY_REFUSE_SECONDS", 3);
    // Enough retries to outlast the window even if every wait were the shortest one.
    let budget = max_retries_within(window * 1000) + 10;
    let env = with(&broker.emulator_env, &retry_env(budget));
    broker.fault(&format!("/$admin/refuse-connections?seconds={window}"));
    let (mut consumer, logs) = spawn_worker(&env);
    let mut captured = Captured::new();
    // Wait for the window to pass, then give the consumer something to receive.
    let started = Instant::now();
    while broker.stats()["refusing_connections_for_seconds"]
        .as_f64()
        .is_none_or(|left| left > 0.0)
    {
        if let Some(line) = logs.next_line(Duration::from_millis(200)) {
            captured.push(line);
        }
        if started.elapsed() > SCENARIO_TIMEOUT {
            let _ = consumer.kill();
            panic!("refusal window never ended:\n{}", captured.text());
        }
    }
    produce_and_receive(&env, &mut consumer, &logs, &mut captured, 3);
    let addr = captured.metrics_addr().expect("metrics address logged");
    // Settlement of the last message may still be in flight.
    std::thread::sleep(Duration::from_millis(500));
    let body = http_get(&addr, "/metrics");
    let reconnects = sample(&body, "servicebusdemo_reconnects_total").expect("reconnects metric");
    terminate(&consumer);
    let code = finish(consumer, logs, &mut captured);
    assert_eq!(code, Some(0), "{}", captured.text());

    let retries = captured.messages_starting_with("connect failed transiently");
    let refused = broker.stats()["amqp_connections_refused"]
        .as_u64()
        .expect("refused count");
    assert!(
        retries.len() >= 3,
        "several retries during the window\n{}",
        captured.text()
    );
    assert_eq!(
        reconnects as u64,
        retries.len() as u64,
        "the metric counts every retry"
    );
    assert_eq!(
        refused,
        retries.len() as u64,
        "every retry was one connection the broker refused"
    );
    // The attempt after each retry line is the next retry line (or the success).
    let next: Vec<serde_json::Value> = retries.iter().skip(1).cloned().collect();
    assert_backoff_followed(&retries, &next);
    let delays: HashSet<u64> = retries
        .iter()
        .filter_map(|l| log_field(l, "delay_ms").and_then(|d| d.as_u64()))
        .collect();
    assert!(
        delays.len() > 1
            && retries.iter().any(|l| {
                let attempt = log_field(l, "attempt")
                    .and_then(|a| a.as_u64())
                    .unwrap_or(1);
                let delay = log_field(l, "delay_ms").and_then(|d| d.as_u64());
                delay != Some(policy_bounds_ms(attempt).0)
            }),
        "delays are jittered, not the bare exponential: {delays:?}"
    );
    assert_eq!(broker.counts(&queue), (0, 0));
    println!(
        "refusal window {window}s: {} retries, reconnects_total {reconnects}, refused {refused}, \
         delays {:?}",
        retries.len(),
        retries
            .iter()
            .filter_map(|l| log_field(l, "delay_ms").and_then(|d| d.as_u64()))
            .collect::<Vec<_>>()
    );
}

/// A busy broker answers sends with server-busy: the producer backs off between attempts as
/// its policy says (no tight loop) and succeeds when the broker recovers. Attempts are counted
/// from the producer's log and the connections it opened from the broker's stats, and both are
/// bounded by the policy's arithmetic: a loop that waited less would make more than fit.
#[test]
fn server_busy_sends_back_off_without_a_tight_loop() {
    let broker = Broker::start();
    let queue = broker.queue();
    let window = env_number("RELIABILITY_BUSY_SECONDS", 3);
    let budget = max_retries_within(window * 1000) + 10;
    let env = with(&broker.emulator_env, &retry_env(budget));
    let connections_before = amqp_connections(&broker);
    broker.fault(&format!("/$admin/server-busy?seconds={window}"));
    let output = run_demo(
        &env,
        &[("OPERATION_MODE", "producer"), ("MESSAGE_COUNT", "5")],
    );
    assert_success(&output);
    let connections = amqp_connections(&broker) - connections_before;
    let lines = log_lines(&output);
    let failures: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| log_message(l).starts_with("send failed transiently"))
        .cloned()
        .collect();
    let busy = failures
        .iter()
        .filter(|l| {
            let error = error_of(l);
            error.contains("server busy") || error.contains("server-busy")
        })
        .count();
    assert!(
        failures.len() >= 2 && busy == failures.len(),
        "several sends refused as busy\n{}",
        describe(&output)
    );
    // Measured on the broker's side: no connection is opened without a logged attempt
    // (today each failed send is retried on a new connection, so the two are equal), so a
    // hidden reconnect loop would show up here.
    let attempts = failures.len() as u64 + 1;
    assert!(
        (1..=attempts).contains(&connections),
        "{connections} connections for {attempts} send attempts\n{}",
        describe(&output)
    );
    let bound = max_retries_within(window * 1000);
    assert!(
        failures.len() as u64 <= bound && connections <= bound + 1,
        "{} failed sends in a {window}s busy window; the policy allows at most {bound}",
        failures.len()
    );
    // Each next attempt is the log line after the retry line that announced its delay:
    // the failure it produced, or (for the last) the batch accepted.
    let accepted: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| log_message(l).starts_with("Sent "))
        .cloned()
        .collect();
    let next: Vec<serde_json::Value> = failures
        .iter()
        .skip(1)
        .cloned()
        .chain(accepted.into_iter().take(1))
        .collect();
    assert_backoff_followed(&failures, &next);
    assert_eq!(broker.counts(&queue), (5, 0), "every message stored once");
    println!(
        "busy window {window}s: {} send attempts, {connections} connections, policy bound {}",
        attempts,
        bound + 1
    );
}

/// Access tokens live only a few seconds (set through the broker's route before the consumer
/// starts, so its first token is short too) while a workload-identity consumer runs several
/// lifetimes: CBS re-authorisation keeps its link authorised, so messages sent at the end are
/// still delivered.
#[test]
fn short_token_lifetime_is_survived_by_cbs_reauthorisation() {
    let broker = Broker::start();
    let queue = broker.queue();
    let lifetime = env_number("RELIABILITY_TOKEN_LIFETIME_SECONDS", 3);
    let lifetimes = env_number("RELIABILITY_TOKEN_LIFETIMES", 4);
    let env = broker.workload_env.clone();
    let issued_before = broker.stats()["tokens_issued"].as_u64().expect("issued");
    broker.fault(&format!("/$admin/token-lifetime?seconds={lifetime}"));
    let (mut consumer, logs) = spawn_worker(&env);
    let mut captured = Captured::new();
    read_until(&mut consumer, &logs, &mut captured, |line| {
        line.contains("metrics address")
    });
    // Send a message per lifetime; each must arrive, the last after all lifetimes passed.
    let run_started = Instant::now();
    for _ in 0..lifetimes {
        produce_and_receive(&env, &mut consumer, &logs, &mut captured, 1);
        std::thread::sleep(Duration::from_secs(lifetime));
    }
    produce_and_receive(&env, &mut consumer, &logs, &mut captured, 1);
    let elapsed = run_started.elapsed();
    let addr = captured.metrics_addr().expect("metrics address logged");
    let body = http_get(&addr, "/metrics");
    let token_requests = sample(
        &body,
        "servicebusdemo_token_requests_total{outcome=\"success\"}",
    )
    .expect("token request metric");
    let issued = broker.stats()["tokens_issued"].as_u64().expect("issued") - issued_before;
    terminate(&consumer);
    let code = finish(consumer, logs, &mut captured);
    assert_eq!(code, Some(0), "{}", captured.text());
    assert!(
        elapsed >= Duration::from_secs(lifetime * lifetimes),
        "the run outlasted {lifetimes} token lifetimes"
    );
    // One token at start, then one before each short token expired.
    assert!(
        token_requests >= (lifetimes + 1) as f64,
        "the consumer re-authorised ({token_requests} token requests in {elapsed:?})\n{}",
        captured.text()
    );
    assert!(
        captured
            .messages_starting_with("connection lost")
            .is_empty(),
        "no reconnect was needed: the link stayed authorised\n{}",
        captured.text()
    );
    assert_eq!(broker.counts(&queue), (0, 0));
    println!(
        "token lifetime {lifetime}s over {elapsed:?}: consumer token requests {token_requests}, \
         tokens issued by the broker {issued}"
    );
}

/// `$cbs` stops answering while a long-running consumer refreshes its token: the put-token
/// times out, the `$cbs` link is replaced on the same connection (fe2o3 does not match
/// answers to requests, so a late answer on the old link could pass for the next one's), and
/// once the broker answers again the retried refresh succeeds before the token lapses: the
/// consumer never reconnects and keeps receiving.
#[test]
fn an_unanswered_token_refresh_is_retried_on_a_fresh_cbs_link() {
    let broker = Broker::start();
    let queue = broker.queue();
    // Refreshed at three quarters of its lifetime: time for a timed-out attempt and a retry.
    let lifetime = env_number("RELIABILITY_CBS_TOKEN_LIFETIME_SECONDS", 20);
    broker.fault(&format!("/$admin/token-lifetime?seconds={lifetime}"));
    let env = with(
        &broker.workload_env,
        &[
            ("OPERATION_TIMEOUT".into(), "1s".into()),
            (
                "RUST_LOG".into(),
                "info,servicebusdemo::servicebus::cbs=debug".into(),
            ),
        ],
    );
    let (mut consumer, logs) = spawn_worker(&env);
    let mut captured = Captured::new();
    // Connected and authorised: from here on, any new connection would be a reconnect.
    read_until(&mut consumer, &logs, &mut captured, |line| {
        line.contains("token accepted")
    });
    let connections_before = amqp_connections(&broker);
    broker.fault("/$admin/silent-cbs?seconds=600");
    read_until(&mut consumer, &logs, &mut captured, |line| {
        line.contains("token refresh failed; retrying")
    });
    broker.fault("/$admin/silent-cbs?seconds=0");
    read_until(&mut consumer, &logs, &mut captured, |line| {
        line.contains("token refreshed")
    });
    let connections_during = amqp_connections(&broker) - connections_before;
    produce_and_receive(&env, &mut consumer, &logs, &mut captured, 3);
    terminate(&consumer);
    let code = finish(consumer, logs, &mut captured);
    assert_eq!(code, Some(0), "{}", captured.text());
    let failed = captured.messages_starting_with("token refresh failed");
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|line| { error_of(line).contains("put-token timed out") }),
        "the refresh failed by timing out\n{}",
        captured.text()
    );
    // The retry came before the first token lapsed (it was issued before it was accepted).
    let accepted = captured.messages_starting_with("token accepted");
    let refreshed = captured.messages_starting_with("token refreshed");
    let renewed_after = gap_seconds(&accepted[0], &refreshed[0]);
    assert!(
        renewed_after < lifetime as f64,
        "refreshed {renewed_after:.1}s after the first token, which lived {lifetime}s\n{}",
        captured.text()
    );
    assert_eq!(
        captured
            .messages_starting_with("attaching a new $cbs link")
            .len(),
        failed.len(),
        "each retry used a fresh $cbs link\n{}",
        captured.text()
    );
    assert_eq!(
        connections_during,
        0,
        "the consumer opened no new connection while $cbs was silent\n{}",
        captured.text()
    );
    assert!(
        captured
            .messages_starting_with("connection lost")
            .is_empty(),
        "no reconnect was needed: the retried refresh kept the link authorised\n{}",
        captured.text()
    );
    assert_eq!(broker.counts(&queue), (0, 0));
    println!(
        "token lifetime {lifetime}s: {} refresh attempt(s) timed out, then refreshed on a new $cbs link",
        failed.len()
    );
}

/// SIGTERM in the middle of a producer run: the producer says it stopped early (exit 1, as
/// it did not send everything), and what it reported as sent is on the queue; at most the
/// batches in flight at the signal (two) may also be there.
#[test]
fn sigterm_mid_produce_loses_nothing_reported_as_sent() {
    let broker = Broker::start();
    let queue = broker.queue();
    let messages = env_number("RELIABILITY_MESSAGES", 2000);
    let count = messages.to_string();
    let (mut producer, logs) = spawn_demo(
        &broker.emulator_env,
        &[
            ("OPERATION_MODE", "producer"),
            ("MESSAGE_COUNT", count.as_str()),
            ("MESSAGE_SIZE", "8192"),
        ],
    );
    let mut captured = Captured::new();
    read_until(&mut producer, &logs, &mut captured, |line| {
        line.contains("\"Sent ")
    });
    terminate(&producer);
    let code = finish(producer, logs, &mut captured);
    let progress = captured.sent_progress();
    let reported = progress.last().copied().unwrap_or(0);
    let largest_batch = largest_step(&progress);
    let (queued, dead) = broker.counts(&queue);
    assert_eq!(dead, 0);
    if reported < messages {
        assert_eq!(
            code,
            Some(1),
            "stopped early is a failure\n{}",
            captured.text()
        );
        assert!(
            captured.text().contains("stopped by a signal"),
            "{}",
            captured.text()
        );
    } else {
        assert_eq!(code, Some(0), "{}", captured.text());
    }
    const BATCHES_IN_FLIGHT: u64 = 2;
    assert!(
        queued >= reported && queued <= reported + BATCHES_IN_FLIGHT * largest_batch,
        "queue holds {queued}; reported sent {reported}, batches up to {largest_batch}"
    );
    println!(
        "SIGTERM after {reported} of {messages} reported sent; queue holds {queued} \
         ({} sent in the batches in flight)",
        queued - reported
    );
}

/// A connection string with a fixed SharedAccessSignature that expires a few seconds into
/// the run: no new signature can come from a fixed one, so nothing retries it. When it
/// lapses (the refresher, or the reconnect after the broker drops the lapsed link, whichever
/// asks first, finds it expired) the consumer exits 1 saying so, without a retry loop.
#[test]
fn an_expired_fixed_signature_ends_the_consumer_without_retrying() {
    use base64::Engine as _;
    use hmac::Mac as _;
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

    let broker = Broker::start();
    let connection_string = &broker.emulator_env["AZURE_SERVICEBUS_CONNECTION_STRING"];
    let field = |name: &str| {
        connection_string
            .split(';')
            .find_map(|part| part.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {connection_string}"))
            .to_string()
    };
    let (endpoint, key_name, key) = (
        field("Endpoint="),
        field("SharedAccessKeyName="),
        field("SharedAccessKey="),
    );
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 6;
    let resource = utf8_percent_encode(&format!("{endpoint}/"), NON_ALPHANUMERIC).to_string();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("hmac key");
    mac.update(format!("{resource}\n{expiry}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sas = format!(
        "SharedAccessSignature sr={resource}&sig={}&se={expiry}&skn={key_name}",
        utf8_percent_encode(&signature, NON_ALPHANUMERIC)
    );
    let env = with(
        &broker.emulator_env,
        &[(
            "AZURE_SERVICEBUS_CONNECTION_STRING".to_string(),
            format!("Endpoint={endpoint};SharedAccessSignature={sas};UseDevelopmentEmulator=true"),
        )],
    );
    let (consumer, logs) = spawn_worker(&env);
    let mut captured = Captured::new();
    let code = exit_within(consumer, logs, &mut captured, Duration::from_secs(60));
    assert_eq!(code, Some(1), "{}", captured.text());
    // At most the refresher's one report: an expired signature is never retried.
    let failures = captured.messages_starting_with("token refresh failed");
    assert!(failures.len() <= 1, "{}", captured.text());
    for failure in &failures {
        assert_eq!(failure["level"].as_str(), Some("ERROR"), "{failure}");
        assert!(error_of(failure).contains("expired"), "{failure}");
    }
    assert!(
        captured.messages_starting_with("connect failed").is_empty(),
        "the reconnect is not retried either\n{}",
        captured.text()
    );
    let error = captured.final_error().unwrap_or_default();
    assert!(
        error.contains("SharedAccessSignature") && error.contains("expired"),
        "the run ends on the expired signature\n{}",
        captured.text()
    );
}

/// The federated token file turns to garbage mid-run (a broken projection): the refresh
/// fails for good, and when the token lapses the broker drops the consumer's link. A worker
/// that could receive nothing more must not sit there looking healthy: it reconnects, the new
/// token request is refused, and it exits 1 with Entra's reason.
#[test]
fn a_token_that_can_no_longer_be_renewed_ends_the_consumer_when_it_lapses() {
    let broker = Broker::start();
    let lifetime = env_number("RELIABILITY_TOKEN_LIFETIME_SECONDS", 3);
    broker.fault(&format!("/$admin/token-lifetime?seconds={lifetime}"));
    let token_file = broker.dir.path().join("projected-token");
    std::fs::copy(
        &broker.workload_env["AZURE_FEDERATED_TOKEN_FILE"],
        &token_file,
    )
    .expect("copy the token file");
    let env = with(
        &broker.workload_env,
        &[(
            "AZURE_FEDERATED_TOKEN_FILE".into(),
            token_file.display().to_string(),
        )],
    );
    let (mut consumer, logs) = spawn_worker(&env);
    let mut captured = Captured::new();
    produce_and_receive(&broker.workload_env, &mut consumer, &logs, &mut captured, 1);
    std::fs::write(&token_file, "not a token\n").expect("break the token file");
    // It ends soon after the token lapses, not at some later timeout (or never).
    let limit = Duration::from_secs(lifetime + 30);
    let code = exit_within(consumer, logs, &mut captured, limit);
    assert_eq!(code, Some(1), "{}", captured.text());
    let gave_up = captured.messages_starting_with("token refresh failed permanently");
    assert_eq!(gave_up.len(), 1, "{}", captured.text());
    assert!(
        captured
            .messages_starting_with("connection lost")
            .iter()
            .any(|line| error_of(line).contains("authorisation lapsed")),
        "the lapsed link was dropped and the consumer reconnected\n{}",
        captured.text()
    );
    assert!(
        captured
            .final_error()
            .is_some_and(|error| error.contains("AADSTS")),
        "the run ends on Entra's refusal\n{}",
        captured.text()
    );
}

/// A broker that drops the consumer every time soon after it connects, with no message in
/// between: after the retry budget the consumer gives up with exit 1 instead of reconnecting
/// forever (each reconnect also waits for the backoff; see the consumer's unit tests).
#[test]
fn a_broker_that_keeps_dropping_the_consumer_ends_it_after_the_retry_budget() {
    let broker = Broker::start();
    let env = with(&broker.emulator_env, &retry_env(2));
    let (consumer, logs) = spawn_worker(&env);
    // Each new connection is dropped once it has had time to attach.
    let watching = std::sync::atomic::AtomicBool::new(true);
    let mut captured = Captured::new();
    let code = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seen = 0;
            let until = Instant::now() + Duration::from_secs(90);
            while watching.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                let now = amqp_connections(&broker);
                if now > seen {
                    seen = now;
                    std::thread::sleep(Duration::from_millis(300));
                    broker.fault("/$admin/drop-connections");
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        let code = exit_within(consumer, logs, &mut captured, Duration::from_secs(60));
        watching.store(false, std::sync::atomic::Ordering::SeqCst);
        code
    });
    assert_eq!(code, Some(1), "{}", captured.text());
    // RETRY_MAX_ATTEMPTS=2: the first loss and two more are reconnected, the fourth ends it.
    let lost = captured.messages_starting_with("connection lost; reconnecting");
    assert_eq!(lost.len(), 3, "{}", captured.text());
    assert!(
        captured
            .final_error()
            .is_some_and(|error| error.contains("no message in between")),
        "{}",
        captured.text()
    );
}
