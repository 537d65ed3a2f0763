//! `GetMetrics` latency under load: CALLERS concurrent KEDA-style calls to a running scaler,
//! repeated WAVES times, after one warm-up call so that every measured call is answered from
//! the scaler's cache (as within one polling interval).
//!
//! ```text
//! scaler_load ADDR QUEUE [CALLERS [WAVES]]     # defaults 1000 callers, 5 waves
//! ```
//!
//! Prints one JSON line: `{"callers":…,"calls":…,"p50_ms":…,"p99_ms":…,"max_ms":…}`.

use std::time::{Duration, Instant};

mod proto {
    tonic::include_proto!("externalscaler");
}

use proto::external_scaler_client::ExternalScalerClient;
use proto::{GetMetricsRequest, ScaledObjectRef};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn request(queue: &str) -> GetMetricsRequest {
    GetMetricsRequest {
        scaled_object_ref: Some(ScaledObjectRef {
            name: "servicebusdemo-consumer".to_owned(),
            namespace: "default".to_owned(),
            scaler_metadata: [("queueName".to_owned(), queue.to_owned())]
                .into_iter()
                .collect(),
        }),
        metric_name: format!("azure-servicebus-{queue}"),
    }
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    let index = (sorted.len() * p / 100).min(sorted.len().saturating_sub(1));
    sorted
        .get(index)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(queue)) = (args.get(1), args.get(2)) else {
        return Err("usage: scaler_load ADDR QUEUE [CALLERS [WAVES]]".into());
    };
    let callers: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let waves: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let client = ExternalScalerClient::connect(format!("http://{addr}")).await?;
    // Fill the cache first: the measured calls are the ones KEDA makes within an interval.
    client.clone().get_metrics(request(queue)).await?;
    let mut latencies = Vec::with_capacity(callers * waves);
    for _ in 0..waves {
        let calls: Vec<_> = (0..callers)
            .map(|_| {
                let mut client = client.clone();
                let request = request(queue);
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer = client.get_metrics(request).await;
                    answer.map(|_| sent.elapsed())
                })
            })
            .collect();
        for call in calls {
            latencies.push(call.await??);
        }
    }
    latencies.sort();
    println!(
        "{{\"callers\":{callers},\"calls\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        latencies.len(),
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        percentile(&latencies, 100),
    );
    Ok(())
}
