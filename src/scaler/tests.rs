//! The gRPC surface end to end in-process: a real tonic server and client, a fake count source.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use super::cache::QueueCountSource;
use super::proto::external_scaler_client::ExternalScalerClient;
use super::proto::{GetMetricsRequest, ScaledObjectRef};
use super::{start, RunningScaler, ScalerOptions, TlsFiles};
use crate::servicebus::admin::{AdminError, QueueCounts};
use crate::telemetry::Metrics;

const HOST: &str = "contoso.servicebus.windows.net";

/// Serves `active` for queue "orders" and "not found" for everything else.
#[derive(Default)]
struct FakeQueue {
    active: AtomicU64,
    calls: AtomicUsize,
}

#[async_trait]
impl QueueCountSource for FakeQueue {
    async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, AdminError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if queue != "orders" {
            return Err(AdminError::QueueNotFound {
                queue: queue.to_owned(),
            });
        }
        Ok(QueueCounts {
            active_messages: self.active.load(Ordering::SeqCst),
            ..QueueCounts::default()
        })
    }
}

fn options(ttl: Duration, tls: Option<TlsFiles>) -> ScalerOptions {
    ScalerOptions {
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        namespace_host: HOST.to_owned(),
        management_endpoint: url::Url::parse("http://127.0.0.1:9/").expect("url"),
        cache_ttl: ttl,
        max_staleness: Duration::from_secs(60),
        poll_queues: Vec::new(),
        request_timeout: Duration::from_secs(5),
        max_queues: 16,
        tls,
    }
}

async fn serve(source: Arc<FakeQueue>, ttl: Duration) -> RunningScaler {
    start(
        &options(ttl, None),
        source,
        Arc::new(Metrics::new("scaler")),
    )
    .await
    .expect("scaler starts")
}

async fn client(scaler: &RunningScaler) -> ExternalScalerClient<Channel> {
    ExternalScalerClient::connect(format!("http://{}", scaler.local_addr()))
        .await
        .expect("connect")
}

fn scaled_object(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "servicebusdemo-consumer".to_owned(),
        namespace: "default".to_owned(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
    }
}

#[tokio::test]
async fn all_four_rpcs_report_the_queue() {
    let source = Arc::new(FakeQueue::default());
    source.active.store(23, Ordering::SeqCst);
    let scaler = serve(source.clone(), Duration::from_millis(50)).await;
    let mut client = client(&scaler).await;
    let trigger = scaled_object(&[
        ("queueName", "orders"),
        ("messageCount", "10"),
        ("activationMessageCount", "2"),
    ]);

    let spec = client
        .get_metric_spec(trigger.clone())
        .await
        .expect("GetMetricSpec")
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let spec = &spec.metric_specs[0];
    assert_eq!(spec.target_size_float, 10.0);
    assert_eq!(spec.target_size, 10);
    assert_eq!(spec.metric_name, "azure-servicebus-orders");

    let metrics = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(trigger.clone()),
            metric_name: spec.metric_name.clone(),
        })
        .await
        .expect("GetMetrics")
        .into_inner();
    assert_eq!(metrics.metric_values.len(), 1);
    assert_eq!(metrics.metric_values[0].metric_value_float, 23.0);
    assert_eq!(metrics.metric_values[0].metric_value, 23);
    assert_eq!(metrics.metric_values[0].metric_name, spec.metric_name);

    let active = client.is_active(trigger.clone()).await.expect("IsActive");
    assert!(active.into_inner().result);

    // Stream: active now, then inactive once the queue drains to the activation threshold.
    let mut stream = client
        .stream_is_active(trigger.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    let first = stream.next().await.expect("first push").expect("ok");
    assert!(first.result);
    source.active.store(2, Ordering::SeqCst);
    let second = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("pushed on change")
        .expect("second push")
        .expect("ok");
    assert!(!second.result);

    let inactive = client.is_active(trigger).await.expect("IsActive");
    assert!(!inactive.into_inner().result);

    // Shutdown ends the open stream instead of waiting for the client to leave.
    scaler.shutdown().await.expect("clean shutdown");
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("stream ends at shutdown");
    assert!(matches!(ended, None | Some(Err(_))), "{ended:?}");
}

#[tokio::test]
async fn bad_metadata_is_invalid_argument_naming_the_field() {
    let scaler = serve(Arc::new(FakeQueue::default()), Duration::from_secs(5)).await;
    let mut client = client(&scaler).await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("messageCount", "5")], "queueName"),
        (
            &[("queueName", "orders"), ("messageCount", "zero")],
            "messageCount",
        ),
        (
            &[("queueName", "orders"), ("namespace", "fabrikam")],
            "namespace",
        ),
        (
            &[("queueName", "orders"), ("activationMessageCount", "-3")],
            "activationMessageCount",
        ),
    ];
    for (pairs, field) in cases {
        let trigger = scaled_object(pairs);
        let statuses = [
            client
                .is_active(trigger.clone())
                .await
                .expect_err("IsActive"),
            client
                .get_metric_spec(trigger.clone())
                .await
                .expect_err("GetMetricSpec"),
            client
                .get_metrics(GetMetricsRequest {
                    scaled_object_ref: Some(trigger.clone()),
                    metric_name: String::new(),
                })
                .await
                .expect_err("GetMetrics"),
            client
                .stream_is_active(trigger.clone())
                .await
                .expect_err("StreamIsActive"),
        ];
        for status in statuses {
            assert_eq!(status.code(), Code::InvalidArgument, "{pairs:?}");
            assert!(status.message().contains(field), "{}", status.message());
        }
    }
    let missing_ref = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: String::new(),
        })
        .await
        .expect_err("no ref");
    assert_eq!(missing_ref.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn missing_queue_is_an_error_keda_sees() {
    let scaler = serve(Arc::new(FakeQueue::default()), Duration::from_secs(5)).await;
    let mut client = client(&scaler).await;
    let trigger = scaled_object(&[("queueName", "nope")]);
    let status = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(trigger.clone()),
            metric_name: String::new(),
        })
        .await
        .expect_err("missing queue");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("nope"));
    let active = client.is_active(trigger).await.expect_err("missing queue");
    assert_eq!(active.code(), Code::NotFound);
}

#[tokio::test]
async fn concurrent_grpc_calls_share_one_count_request() {
    let source = Arc::new(FakeQueue::default());
    source.active.store(100, Ordering::SeqCst);
    // Long TTL: every call in this test falls in one interval.
    let scaler = serve(source.clone(), Duration::from_secs(600)).await;
    let client = client(&scaler).await;
    let trigger = scaled_object(&[("queueName", "orders"), ("messageCount", "10")]);
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            let trigger = trigger.clone();
            tokio::spawn(async move {
                client
                    .get_metrics(GetMetricsRequest {
                        scaled_object_ref: Some(trigger),
                        metric_name: String::new(),
                    })
                    .await
            })
        })
        .collect();
    for call in calls {
        let response = call.await.expect("join").expect("GetMetrics").into_inner();
        assert_eq!(response.metric_values[0].metric_value, 100);
    }
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let scaler = serve(Arc::new(FakeQueue::default()), Duration::from_secs(5)).await;
    let channel = Endpoint::from_shared(format!("http://{}", scaler.local_addr()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "externalscaler.ExternalScaler"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            response.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

/// A CA, a server certificate for `localhost` and a client certificate, all PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    other_client_cert_pem: String,
    other_client_key_pem: String,
}

fn issue_pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".to_owned()]);
    let (client_cert_pem, client_key_pem) = leaf(vec!["keda-operator".to_owned()]);

    // A client certificate from a CA the scaler does not trust.
    let rogue_key = KeyPair::generate().expect("rogue key");
    let other_client_cert_pem = CertificateParams::new(vec!["intruder".to_owned()])
        .expect("params")
        .self_signed(&rogue_key)
        .expect("self-signed")
        .pem();

    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, contents: &str| {
        std::fs::write(dir.path().join(name), contents).expect("write pem");
    };
    write("ca.pem", &ca_cert.pem());
    write("server.pem", &server_cert);
    write("server.key", &server_key);
    Pki {
        ca_pem: ca_cert.pem(),
        client_cert_pem,
        client_key_pem,
        other_client_cert_pem,
        other_client_key_pem: rogue_key.serialize_pem(),
        dir,
    }
}

async fn tls_client(
    scaler: &RunningScaler,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<ExternalScalerClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel =
        Endpoint::from_shared(format!("https://localhost:{}", scaler.local_addr().port()))?
            .tls_config(tls)?
            .connect()
            .await?;
    Ok(ExternalScalerClient::new(channel))
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = issue_pki();
    let source = Arc::new(FakeQueue::default());
    source.active.store(4, Ordering::SeqCst);
    let trigger = scaled_object(&[("queueName", "orders")]);
    let path = |name: &str| pki.dir.path().join(name);

    // Server TLS only.
    let tls = TlsFiles {
        cert: path("server.pem"),
        key: path("server.key"),
        client_ca: None,
    };
    let scaler = start(
        &options(Duration::from_secs(5), Some(tls.clone())),
        source.clone(),
        Arc::new(Metrics::new("scaler")),
    )
    .await
    .expect("tls scaler");
    let mut client = tls_client(&scaler, &pki.ca_pem, None)
        .await
        .expect("tls connect");
    assert!(
        client
            .is_active(trigger.clone())
            .await
            .expect("IsActive")
            .into_inner()
            .result
    );
    // A plaintext client cannot talk to it.
    let mut plain = ExternalScalerClient::connect(format!("http://{}", scaler.local_addr()))
        .await
        .expect("tcp connect");
    assert!(plain.is_active(trigger.clone()).await.is_err());
    scaler.shutdown().await.expect("shutdown");

    // Mutual TLS: a client certificate signed by the configured CA is required.
    let mtls = TlsFiles {
        client_ca: Some(path("ca.pem")),
        ..tls
    };
    let scaler = start(
        &options(Duration::from_secs(5), Some(mtls)),
        source,
        Arc::new(Metrics::new("scaler")),
    )
    .await
    .expect("mtls scaler");
    let mut trusted = tls_client(
        &scaler,
        &pki.ca_pem,
        Some((&pki.client_cert_pem, &pki.client_key_pem)),
    )
    .await
    .expect("mtls connect");
    assert!(
        trusted
            .is_active(trigger.clone())
            .await
            .expect("IsActive")
            .into_inner()
            .result
    );

    for identity in [
        None,
        Some((
            pki.other_client_cert_pem.as_str(),
            pki.other_client_key_pem.as_str(),
        )),
    ] {
        let refused = match tls_client(&scaler, &pki.ca_pem, identity).await {
            Err(_) => true,
            Ok(mut client) => client.is_active(trigger.clone()).await.is_err(),
        };
        assert!(refused, "client without a trusted certificate was served");
    }
    scaler.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn missing_tls_files_are_reported_by_path() {
    let tls = TlsFiles {
        cert: "/nonexistent/server.pem".into(),
        key: "/nonexistent/server.key".into(),
        client_ca: None,
    };
    let err = start(
        &options(Duration::from_secs(5), Some(tls)),
        Arc::new(FakeQueue::default()),
        Arc::new(Metrics::new("scaler")),
    )
    .await
    .expect_err("missing files");
    assert!(err.to_string().contains("/nonexistent/server.pem"), "{err}");
}
