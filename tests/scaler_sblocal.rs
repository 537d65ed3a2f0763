//! The scaler as a real process against the local Service Bus (`sblocal`): gRPC answers match
//! the queue, concurrent KEDA polls cost one management request per interval, and the
//! tutorial replays end to end with `kedasim` launching real consumer processes.
//!
//! Needs the workspace binaries (`cargo test --workspace` builds them).

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::Code;

mod common;

use common::{demo_command, run_producer, Broker, LogStream};

mod proto {
    tonic::include_proto!("externalscaler");
}

use proto::external_scaler_client::ExternalScalerClient;
use proto::{GetMetricsRequest, ScaledObjectRef};

const QUEUE: &str = "orders";
/// A second queue the scaler does not poll in the background: only gRPC calls fetch it.
const UNPOLLED_QUEUE: &str = "burst";

/// A child process killed when dropped.
struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The local Service Bus with the two queues these tests use, and the scaler's view of it.
struct Sblocal {
    broker: Broker,
}

impl Sblocal {
    fn start() -> Sblocal {
        let broker = Broker::with_queues(&[
            (
                QUEUE,
                serde_json::json!({ "LockDuration": "PT1M", "MaxDeliveryCount": 10 }),
            ),
            (UNPOLLED_QUEUE, serde_json::json!({})),
        ]);
        Sblocal { broker }
    }

    /// `Broker::stats` uses a blocking client, which must not run inside these tests'
    /// runtime.
    async fn stats(&self) -> serde_json::Value {
        let url = format!("{}/$admin/stats", self.broker.http_base());
        let body = reqwest::get(url)
            .await
            .expect("stats")
            .text()
            .await
            .expect("stats body");
        serde_json::from_str(&body).expect("stats json")
    }

    async fn atom_requests(&self) -> u64 {
        self.stats()
            .await
            .get("atom_requests")
            .and_then(serde_json::Value::as_u64)
            .expect("atom_requests")
    }

    async fn active_messages(&self) -> u64 {
        self.stats().await["queues"][QUEUE]["active_messages"]
            .as_u64()
            .expect("active_messages")
    }

    fn produce(&self, count: u64) {
        self.produce_to(QUEUE, count);
    }

    fn produce_to(&self, queue: &str, count: u64) {
        run_producer(
            &self.broker.emulator_env,
            count,
            &[("AZURE_SERVICEBUS_QUEUE_NAME", queue)],
        );
    }

    fn start_scaler(&self, cache_ttl: &str) -> Scaler {
        self.start_scaler_with(cache_ttl, &[])
    }

    fn start_scaler_with(&self, cache_ttl: &str, extra_env: &[(&str, &str)]) -> Scaler {
        let mut settings = vec![
            ("OPERATION_MODE", "scaler"),
            ("AZURE_SERVICEBUS_QUEUE_NAME", QUEUE),
            ("SCALER_GRPC_ADDR", "127.0.0.1:0"),
            ("SCALER_CACHE_TTL", cache_ttl),
        ];
        settings.extend_from_slice(extra_env);
        let mut child = demo_command(&self.broker.emulator_env, &settings)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn scaler");
        let log = LogStream::attach(&mut child);
        let process = Running { child };
        let mut grpc = None;
        let mut metrics = None;
        while grpc.is_none() || metrics.is_none() {
            let line = log
                .wait_for(Duration::from_secs(30), |line| line.contains("\"addr\""))
                .expect("scaler logs its addresses");
            let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            let addr = json["addr"].as_str().map(str::to_owned);
            let message = json["message"].as_str().unwrap_or_default();
            if message.contains("externalscaler.ExternalScaler") {
                grpc = addr;
            } else if message.contains("/metrics") {
                metrics = addr;
            }
        }
        Scaler {
            _process: process,
            grpc: grpc.expect("grpc addr"),
            metrics: metrics.expect("metrics addr"),
            log,
        }
    }
}

struct Scaler {
    _process: Running,
    grpc: String,
    metrics: String,
    /// The rest of its log lines.
    log: LogStream,
}

impl Scaler {
    async fn client(&self) -> ExternalScalerClient<tonic::transport::Channel> {
        ExternalScalerClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to scaler")
    }

    async fn scrape(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    }
}

fn trigger(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "servicebusdemo-consumer".to_owned(),
        namespace: "default".to_owned(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

fn metrics_request(pairs: &[(&str, &str)]) -> GetMetricsRequest {
    GetMetricsRequest {
        scaled_object_ref: Some(trigger(pairs)),
        metric_name: "azure-servicebus-orders".to_owned(),
    }
}

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_answers_match_the_sblocal_queue() {
    install_crypto();
    let sblocal = Sblocal::start();
    sblocal.produce(37);
    let scaler = sblocal.start_scaler("1s");
    let mut client = scaler.client().await;
    let target = [("queueName", QUEUE), ("messageCount", "10")];

    let spec = client
        .get_metric_spec(trigger(&target))
        .await
        .expect("GetMetricSpec")
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(spec.metric_specs[0].target_size_float, 10.0);

    let value = client
        .get_metrics(metrics_request(&target))
        .await
        .expect("GetMetrics")
        .into_inner();
    assert_eq!(value.metric_values.len(), 1);
    assert_eq!(value.metric_values[0].metric_value_float, 37.0);
    assert_eq!(sblocal.active_messages().await, 37);

    assert!(
        client
            .is_active(trigger(&target))
            .await
            .expect("IsActive")
            .into_inner()
            .result
    );
    let above = [("queueName", QUEUE), ("activationMessageCount", "37")];
    assert!(
        !client
            .is_active(trigger(&above))
            .await
            .expect("IsActive")
            .into_inner()
            .result
    );

    let missing = client
        .get_metrics(metrics_request(&[("queueName", "no-such-queue")]))
        .await
        .expect_err("missing queue");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    let bad = client
        .get_metric_spec(trigger(&[("queueName", QUEUE), ("messageCount", "many")]))
        .await
        .expect_err("bad metadata");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("messageCount"));

    // The gauges on /metrics come from the same counts.
    let body = scaler.scrape().await;
    assert!(
        body.contains("servicebusdemo_queue_active_messages{queue=\"orders\"} 37"),
        "{body}"
    );
    assert!(body.contains("servicebusdemo_management_requests_total{outcome=\"success\"}"));
    assert!(body.contains("servicebusdemo_management_requests_total{outcome=\"not_found\"} 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn thousand_concurrent_get_metrics_cost_one_management_request() {
    install_crypto();
    let sblocal = Sblocal::start();
    sblocal.produce_to(UNPOLLED_QUEUE, 12);
    // One interval spans the whole burst.
    let scaler = sblocal.start_scaler("60s");
    let client = scaler.client().await;
    let before = sblocal.atom_requests().await;

    let started = Instant::now();
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let response = client
                    .get_metrics(metrics_request(&[("queueName", UNPOLLED_QUEUE)]))
                    .await;
                (response, sent.elapsed())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(calls.len());
    for call in calls {
        let (response, latency) = call.await.expect("join");
        let response = response.expect("GetMetrics").into_inner();
        assert_eq!(response.metric_values[0].metric_value, 12);
        latencies.push(latency);
    }
    let total = started.elapsed();
    let after = sblocal.atom_requests().await;
    assert_eq!(
        after - before,
        1,
        "1000 concurrent calls on a cold cache must cost exactly one management request"
    );

    // Within the same interval the next wave is served from the cache.
    let mut client = client;
    let again = client
        .get_metrics(metrics_request(&[("queueName", UNPOLLED_QUEUE)]))
        .await
        .expect("GetMetrics")
        .into_inner();
    assert_eq!(again.metric_values[0].metric_value, 12);
    assert_eq!(sblocal.atom_requests().await, after);

    latencies.sort();
    let percentile = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    eprintln!(
        "GetMetrics x1000 concurrent: {} management request(s); p50 {:?}, p99 {:?}, total {:?}",
        after - before,
        percentile(50),
        percentile(99),
        total
    );
}

/// Message ids a consumer job logged as received, and the completed count it reported.
fn job_log_summary(log: &str) -> (Vec<String>, u64) {
    let mut received = Vec::new();
    let mut completed = 0;
    for line in log.lines() {
        let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let message = json["message"].as_str().unwrap_or_default();
        if message.starts_with("Received message") {
            if let Some(id) = json["message_id"].as_str() {
                received.push(id.to_owned());
            }
        }
        if message == "consumer finished" {
            completed += json["completed"].as_u64().unwrap_or_default();
        }
    }
    (received, completed)
}

#[tokio::test(flavor = "multi_thread")]
async fn tutorial_replay_ten_jobs_drain_one_hundred_messages() {
    install_crypto();
    let sblocal = Sblocal::start();
    sblocal.produce(100);
    // A TTL well under the polling interval: each poll sees the queue as the jobs left it.
    let scaler = sblocal.start_scaler("50ms");
    let jobs_dir = sblocal.broker.dir.path().join("jobs");

    let mut command = Command::new(common::workspace_binary("kedasim"));
    command
        .args(["--scaler-address", &scaler.grpc])
        .args(["--metadata", &format!("queueName={QUEUE}")])
        .args(["--metadata", "messageCount=10"])
        .args([
            "--polling-interval",
            "1s",
            "--until-inactive",
            "--timeout",
            "240s",
        ])
        .arg("--log-dir")
        .arg(&jobs_dir)
        .args([
            "--env",
            "OPERATION_MODE=consumer",
            "--env",
            "MESSAGE_COUNT=10",
        ])
        .args([
            "--env",
            "CONSUMER_IDLE_TIMEOUT=3s",
            "--env",
            "METRICS_ADDR=127.0.0.1:0",
        ])
        .args(["--env", "LOG_FORMAT=json"]);
    for (key, value) in &sblocal.broker.emulator_env {
        command.arg("--env").arg(format!("{key}={value}"));
    }
    command
        .args(["--env", &format!("AZURE_SERVICEBUS_QUEUE_NAME={QUEUE}")])
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_servicebusdemo"));
    let output = command.output().expect("run kedasim");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kedasim failed\n{stdout}\n{stderr}"
    );

    let live = stdout.split("\nName:").next().unwrap_or_default();
    let created: u64 = live
        .lines()
        .filter(|line| line.contains("KEDAJobsCreated"))
        .filter_map(|line| line.rsplit("Created ").next())
        .filter_map(|rest| rest.trim_end().strip_suffix(" jobs"))
        .map(|n| n.parse::<u64>().expect("job count"))
        .sum();
    assert_eq!(
        created, 10,
        "expected ceil(100/10) jobs; more means a poll saw messages that exited jobs had already \
         completed (a count older than the jobs' exit)\n{stdout}\n{stderr}"
    );

    let mut ids = Vec::new();
    let mut completed = 0;
    for entry in std::fs::read_dir(&jobs_dir).expect("job logs") {
        let log = std::fs::read_to_string(entry.expect("entry").path()).expect("log");
        let (received, job_completed) = job_log_summary(&log);
        ids.extend(received);
        completed += job_completed;
    }
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(completed, 100, "every message completed");
    assert_eq!(unique.len(), 100, "100 distinct messages received");
    assert_eq!(ids.len(), 100, "no message received twice");
    assert_eq!(sblocal.active_messages().await, 0, "the queue ends empty");
}

mod otlp {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    pub use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use tokio::sync::mpsc::UnboundedSender;

    /// An OTLP/gRPC trace collector handing every export to the test.
    pub struct Collector(pub UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    pub fn server(collector: Collector) -> TraceServiceServer<Collector> {
        TraceServiceServer::new(collector)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rpc_spans_are_exported_and_json_logs_carry_their_trace_id() {
    install_crypto();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector_addr = listener.local_addr().expect("addr");
    let (tx, mut exports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(otlp::server(otlp::Collector(tx)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let sblocal = Sblocal::start();
    let endpoint = format!("http://{collector_addr}");
    let scaler = sblocal.start_scaler_with("1s", &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    let mut client = scaler.client().await;
    let refused = client
        .get_metrics(metrics_request(&[("queueName", "no-such-queue")]))
        .await
        .expect_err("missing queue");
    assert_eq!(refused.code(), Code::NotFound);

    // The refusal is logged inside the GetMetrics span, with its trace id.
    let line = scaler
        .log
        .wait_for(Duration::from_secs(10), |line| {
            line.contains("call refused")
        })
        .expect("the refused call is logged");
    let json: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    let logged_trace_id = json["trace_id"]
        .as_str()
        .expect("trace_id field")
        .to_owned();
    assert_eq!(json["span"]["queue"], "no-such-queue", "{line}");

    // The batch exporter sends within its schedule (5 s by default).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("a GetMetrics span with the logged trace id is exported");
        let export: otlp::ExportTraceServiceRequest = tokio::time::timeout(left, exports.recv())
            .await
            .expect("an export arrives")
            .expect("export");
        let found = export.resource_spans.iter().any(|resource| {
            let service = resource.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.clone())
            });
            let is_scaler = format!("{service:?}").contains("servicebusdemo-scaler");
            is_scaler
                && resource.scope_spans.iter().any(|scope| {
                    scope.spans.iter().any(|span| {
                        span.name == "GetMetrics" && hex(&span.trace_id) == logged_trace_id
                    })
                })
        });
        if found {
            break;
        }
    }
}

/// PEM files: a CA, a scaler certificate for `localhost`, a client certificate from the CA.
fn write_pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).expect("ca").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |name: &str, sans: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(sans)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("cert");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("key");
    };
    issue("scaler", vec!["localhost".to_owned()]);
    issue("keda", vec!["keda-operator".to_owned()]);
    std::fs::write(dir.join("ca.pem"), ca_pem).expect("ca file");
}

#[tokio::test(flavor = "multi_thread")]
async fn kedasim_reaches_a_mutual_tls_scaler_only_with_a_client_certificate() {
    install_crypto();
    let sblocal = Sblocal::start();
    let pki = sblocal.broker.dir.path().join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    write_pki(&pki);
    let file = |name: &str| pki.join(name).display().to_string();
    let scaler = sblocal.start_scaler_with(
        "1s",
        &[
            ("SCALER_TLS_CERT_FILE", &file("scaler.pem")),
            ("SCALER_TLS_KEY_FILE", &file("scaler.key")),
            ("SCALER_TLS_CLIENT_CA_FILE", &file("ca.pem")),
        ],
    );
    let kedasim = |client_cert: bool| {
        let mut command = Command::new(common::workspace_binary("kedasim"));
        command
            .args(["--scaler-address", &scaler.grpc])
            .args([
                "--tls-server-name",
                "localhost",
                "--ca-cert",
                &file("ca.pem"),
            ])
            .args(["--metadata", &format!("queueName={QUEUE}")])
            .args(["--polling-interval", "200ms", "--until-inactive"])
            .args(["--timeout", "3s"]);
        if client_cert {
            command
                .args(["--tls-client-cert", &file("keda.pem")])
                .args(["--tls-client-key", &file("keda.key")]);
        }
        command.args(["--", "/bin/true"]);
        command.output().expect("run kedasim")
    };

    // With the client certificate: the empty queue is inactive, so it stops after one poll.
    let trusted = kedasim(true);
    let stdout = String::from_utf8_lossy(&trusted.stdout);
    assert!(
        trusted.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert!(!stdout.contains("KEDAScalerFailed"), "{stdout}");

    // Without it the handshake is refused on every poll until the timeout.
    let refused = kedasim(false);
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success(), "{stdout}");
    assert!(stdout.contains("KEDAScalerFailed"), "{stdout}");
}
