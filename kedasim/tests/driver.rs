//! kedasim against a scripted external scaler whose "queue" is a directory of files, with
//! jobs that each take (atomically, by rename) up to MESSAGE_COUNT files.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kedasim::proto::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use kedasim::proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

struct DirQueue {
    dir: PathBuf,
    calls: Arc<AtomicUsize>,
}

impl DirQueue {
    fn depth(&self) -> Result<u64, Status> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Status::internal(e.to_string()))?;
        Ok(entries.count() as u64)
    }
}

fn target(reference: &ScaledObjectRef) -> Result<f64, Status> {
    reference
        .scaler_metadata
        .get("messageCount")
        .ok_or_else(|| Status::invalid_argument("messageCount"))?
        .parse()
        .map_err(|_| Status::invalid_argument("messageCount"))
}

type Stream = Pin<Box<dyn tokio_stream::Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for DirQueue {
    async fn is_active(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(IsActiveResponse {
            result: self.depth()? > 0,
        }))
    }

    type StreamIsActiveStream = Stream;

    async fn stream_is_active(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Stream>, Status> {
        Err(Status::unimplemented("not used by ScaledJobs"))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let target = target(request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: "files".to_owned(),
                target_size: 0,
                target_size_float: target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let depth = self.depth()?;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: request.into_inner().metric_name,
                metric_value: depth as i64,
                metric_value_float: depth as f64,
            }],
        }))
    }
}

async fn start_scaler(dir: &Path) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let service = DirQueue {
        dir: dir.to_owned(),
        calls: calls.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ExternalScalerServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, calls)
}

/// Each job moves up to MESSAGE_COUNT files from QUEUE_DIR to DONE_DIR; `mv` is a rename,
/// so two jobs never take the same file.
const JOB: &str = r#"
taken=0
for f in "$QUEUE_DIR"/*; do
  [ "$taken" -ge "$MESSAGE_COUNT" ] && break
  [ -e "$f" ] || continue
  if mv "$f" "$DONE_DIR/$(basename "$f").$KEDASIM_JOB_NAME" 2>/dev/null; then
    taken=$((taken + 1))
  fi
done
sleep 0.3
"#;

#[tokio::test]
async fn tutorial_shape_creates_ten_jobs_and_drains_the_queue() {
    let root = tempfile::tempdir().expect("tempdir");
    let queue = root.path().join("queue");
    let done = root.path().join("done");
    std::fs::create_dir_all(&queue).expect("queue dir");
    std::fs::create_dir_all(&done).expect("done dir");
    for i in 0..100 {
        std::fs::write(queue.join(format!("msg-{i:03}")), b"x").expect("message");
    }
    let (addr, calls) = start_scaler(&queue).await;

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kedasim"))
        .args([
            "--scaler-address",
            &addr.to_string(),
            "--metadata",
            "queueName=orders",
            "--metadata",
            "messageCount=10",
            "--polling-interval",
            "200ms",
            "--until-inactive",
            "--timeout",
            "60s",
            "--env",
            "MESSAGE_COUNT=10",
            "--env",
            &format!("QUEUE_DIR={}", queue.display()),
            "--env",
            &format!("DONE_DIR={}", done.display()),
            "--",
            "/bin/sh",
            "-c",
            JOB,
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run kedasim");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // Every "message" consumed exactly once, by ten jobs of ten.
    assert_eq!(std::fs::read_dir(&queue).expect("queue").count(), 0);
    let consumed: Vec<String> = std::fs::read_dir(&done)
        .expect("done")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(consumed.len(), 100);
    // Events stream live first; the `kubectl describe`-style summary follows.
    let (live, summary) = stdout.split_once("\nName:").expect("summary block");
    assert!(summary.contains("KEDAJobsCreated"), "{summary}");
    let created: Vec<&str> = live
        .lines()
        .filter(|line| line.contains("KEDAJobsCreated"))
        .collect();
    assert_eq!(created.len(), 1, "{stdout}");
    assert!(
        created[0].trim_end().ends_with("Created 10 jobs"),
        "{stdout}"
    );
    assert!(stdout.contains("ScaledJobActive"), "{stdout}");
    assert!(stdout.contains("ScaledJobInactive"), "{stdout}");
    assert!(
        stdout.contains("jobs created 10, succeeded 10, failed 0"),
        "{stdout}"
    );
    assert!(calls.load(Ordering::SeqCst) >= 2, "polled at least twice");
}

#[tokio::test]
async fn unreachable_scaler_times_out_with_warnings_and_failure() {
    // A port nobody listens on: bind, note the port, close.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kedasim"))
        .args([
            "--scaler-address",
            &addr.to_string(),
            "--metadata",
            "messageCount=10",
            "--polling-interval",
            "100ms",
            "--until-inactive",
            "--timeout",
            "1s",
            "--",
            "/bin/true",
        ])
        .output()
        .await
        .expect("run kedasim");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(stdout.contains("KEDAScalerFailed"), "{stdout}");
    assert!(stdout.contains("KEDASimTimeout"), "{stdout}");
    assert!(!stdout.contains("KEDAJobsCreated"), "{stdout}");
}

#[tokio::test]
async fn bad_arguments_exit_2_naming_the_flag() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kedasim"))
        .args([
            "--scaler-address",
            "127.0.0.1:1",
            "--metadata",
            "queueName",
            "--",
            "/bin/true",
        ])
        .output()
        .await
        .expect("run kedasim");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--metadata"));
}

#[tokio::test]
async fn sigterm_stops_the_loop_and_passes_sigterm_to_running_jobs() {
    use tokio::io::{AsyncBufReadExt as _, BufReader};

    let root = tempfile::tempdir().expect("tempdir");
    let queue = root.path().join("queue");
    std::fs::create_dir_all(&queue).expect("queue dir");
    std::fs::write(queue.join("msg"), b"x").expect("message");
    let marker = root.path().join("terminated");
    let (addr, _) = start_scaler(&queue).await;

    // A job that waits until it is told to stop, and records that it was.
    let job = format!(
        "trap 'echo term > {}; exit 0' TERM; while true; do sleep 0.1; done",
        marker.display()
    );
    let mut kedasim = tokio::process::Command::new(env!("CARGO_BIN_EXE_kedasim"))
        .args(["--scaler-address", &addr.to_string()])
        .args([
            "--metadata",
            "messageCount=1",
            "--polling-interval",
            "100ms",
        ])
        .args(["--timeout", "60s", "--", "/bin/sh", "-c", &job])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kedasim");
    let stdout = kedasim.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("a job is created")
            .expect("read")
            .expect("kedasim still running");
        if line.contains("KEDAJobsCreated") {
            break;
        }
    }
    // Give the shell a moment to install its trap before it is signalled.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let pid = kedasim.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), kedasim.wait())
        .await
        .expect("kedasim stops")
        .expect("status");
    assert!(!status.success(), "an interrupted run is not a success");
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("the job got SIGTERM")
            .trim(),
        "term"
    );
}
