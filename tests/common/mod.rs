//! Helpers for integration tests: a real `sblocal` broker in a temp dir, the real
//! `servicebusdemo` binary as a child process, JSON log parsing, the broker's stats route.
//!
//! `sblocal` is found next to this crate's binary in the target directory; build it first
//! with `cargo build -p sblocal`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Upper bound for any single child process in these tests (a safety net, not an assertion).
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);

pub fn demo_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_servicebusdemo"))
}

/// `target/<profile>/sblocal`, next to our binary.
pub fn sblocal_binary() -> PathBuf {
    workspace_binary("sblocal")
}

/// Another binary of the workspace (`sblocal`, `kedasim`), built next to ours.
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = demo_binary().with_file_name(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace first with `cargo build --workspace`",
        path.display()
    );
    path
}

/// A running `sblocal` with its directory and the env files it wrote.
pub struct Broker {
    child: Child,
    pub dir: tempfile::TempDir,
    pub emulator_env: HashMap<String, String>,
    pub workload_env: HashMap<String, String>,
}

impl Broker {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        Self::launch(None, extra)
    }

    /// A broker serving only `queues`: each a name and its emulator `Properties`
    /// (`LockDuration`, `MaxDeliveryCount`, ...), in the emulator's Config.json format.
    pub fn with_queues(queues: &[(&str, serde_json::Value)]) -> Self {
        let queues: Vec<serde_json::Value> = queues
            .iter()
            .map(|(name, properties)| serde_json::json!({ "Name": name, "Properties": properties }))
            .collect();
        let config = serde_json::json!({
            "UserConfig": {
                "Namespaces": [{ "Name": "sbemulatorns", "Queues": queues }],
                "Logging": { "Type": "Console" }
            }
        });
        Self::launch(Some(&config), &[])
    }

    fn launch(config: Option<&serde_json::Value>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(sblocal_binary());
        command.args(["serve", "--dir"]).arg(dir.path()).args([
            "--amqp",
            "127.0.0.1:0",
            "--amqps",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
        ]);
        if let Some(config) = config {
            // Beside the broker's own files, none of which has this name.
            let path = dir.path().join("test-config.json");
            std::fs::write(&path, config.to_string()).expect("write the broker's config");
            command.arg("--config").arg(path);
        }
        let mut child = command
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sblocal");
        let ready = LogStream::attach(&mut child)
            .wait_for(Duration::from_secs(30), |line| line.trim() == "ready");
        if ready.is_none() {
            let _ = child.kill();
            panic!("sblocal did not print `ready` within 30s");
        }
        let emulator_env = read_env_file(&dir.path().join("emulator.env"));
        let workload_env = read_env_file(&dir.path().join("workload.env"));
        Self {
            child,
            dir,
            emulator_env,
            workload_env,
        }
    }

    pub fn queue(&self) -> String {
        self.emulator_env["AZURE_SERVICEBUS_QUEUE_NAME"].clone()
    }

    /// Base URL of the plain HTTP port (ATOM, `/$admin/`).
    pub fn http_base(&self) -> String {
        self.emulator_env["AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT"]
            .trim_end_matches('/')
            .to_string()
    }

    /// `GET /$admin/stats` as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let body = http(&self.http_base(), "GET", "/$admin/stats");
        serde_json::from_str(&body).expect("stats JSON")
    }

    /// (active, dead-letter) counts of a queue.
    pub fn counts(&self, queue: &str) -> (u64, u64) {
        let stats = self.stats();
        let q = &stats["queues"][queue];
        (
            q["active_messages"].as_u64().expect("active_messages"),
            q["dead_letter_messages"]
                .as_u64()
                .expect("dead_letter_messages"),
        )
    }

    /// POST a fault-injection route, e.g. `/$admin/drop-connections`.
    pub fn fault(&self, path_and_query: &str) {
        http(&self.http_base(), "POST", path_and_query);
    }

    /// Mint a service-account token like the kubelet projects it.
    pub fn mint_token(&self, subject: &str, ttl_seconds: i64) -> String {
        let output = Command::new(sblocal_binary())
            .args(["token", "--dir"])
            .arg(self.dir.path())
            .args(["--sub", subject, "--ttl", &ttl_seconds.to_string()])
            .output()
            .expect("run sblocal token");
        assert!(output.status.success(), "sblocal token failed: {output:?}");
        String::from_utf8(output.stdout)
            .expect("token is UTF-8")
            .trim()
            .to_string()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// KEY=VALUE lines; values are taken verbatim (connection strings contain `;` and `=`).
pub fn read_env_file(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect()
}

/// A blocking HTTP client for the plain ports (the broker's `/$admin/`, our metrics), built
/// once per test binary.
fn http_client() -> &'static reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        // reqwest is built without a default TLS provider; the product installs ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client")
    })
}

/// `METHOD base+path` on the broker's plain port; the body of a 2xx answer.
fn http(base: &str, method: &str, path: &str) -> String {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
    let response = http_client()
        .request(method.clone(), format!("{base}{path}"))
        .send()
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    let status = response.status();
    let body = response.text().expect("response body");
    assert!(status.is_success(), "{method} {path}: {status} {body}");
    body
}

/// `GET path` on a worker's metrics address (`host:port`): the status code and the body.
pub fn metrics_get(addr: &str, path: &str) -> (u16, String) {
    let response = http_client()
        .get(format!("http://{addr}{path}"))
        .send()
        .unwrap_or_else(|err| panic!("GET {addr}{path}: {err}"));
    let status = response.status().as_u16();
    (status, response.text().expect("response body"))
}

/// A `servicebusdemo` command with a clean environment plus `env`.
pub fn demo_command(env: &HashMap<String, String>, extra: &[(&str, &str)]) -> Command {
    let mut command = Command::new(demo_binary());
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("OPERATION_TIMEOUT", "10s")
        .env("RETRY_BASE_DELAY", "100ms")
        .env("RETRY_MAX_DELAY", "1s");
    for (key, value) in env {
        command.env(key, value);
    }
    for (key, value) in extra {
        command.env(key, value);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Run to completion (bounded by [`PROCESS_TIMEOUT`]).
pub fn run_demo(env: &HashMap<String, String>, extra: &[(&str, &str)]) -> Output {
    let child = demo_command(env, extra)
        .spawn()
        .expect("spawn servicebusdemo");
    wait_output(child)
}

/// Run a producer that sends `count` messages (more settings in `extra`) and require success.
pub fn run_producer(env: &HashMap<String, String>, count: u64, extra: &[(&str, &str)]) -> Output {
    let count = count.to_string();
    let mut settings = vec![
        ("OPERATION_MODE", "producer"),
        ("MESSAGE_COUNT", count.as_str()),
    ];
    settings.extend_from_slice(extra);
    let output = run_demo(env, &settings);
    assert_success(&output);
    output
}

pub fn wait_output(mut child: Child) -> Output {
    let started = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().expect("wait") {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > PROCESS_TIMEOUT {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "servicebusdemo did not finish within {PROCESS_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// JSON log lines of a run (other lines ignored).
pub fn log_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .collect()
}

/// A field of a JSON log line, whether the formatter flattens fields or nests them.
pub fn log_field<'a>(line: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    line.get(name)
        .or_else(|| line.get("fields").and_then(|fields| fields.get(name)))
}

pub fn log_message(line: &serde_json::Value) -> &str {
    log_field(line, "message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
}

/// Message ids of the `Received message: ...` lines.
pub fn received_ids(output: &Output) -> Vec<String> {
    log_lines(output)
        .iter()
        .filter(|line| log_message(line).starts_with("Received message: "))
        .map(|line| {
            log_field(line, "message_id")
                .and_then(|id| id.as_str())
                .expect("message_id field")
                .to_string()
        })
        .collect()
}

pub fn describe(output: &Output) -> String {
    format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn assert_success(output: &Output) {
    assert!(output.status.success(), "{}", describe(output));
}

pub fn exit_code(status: ExitStatus) -> Option<i32> {
    status.code()
}

/// Send SIGTERM to a child we started.
pub fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
}

/// Starts `servicebusdemo` (see [`demo_command`]) and follows its merged log lines.
pub fn spawn_demo(env: &HashMap<String, String>, extra: &[(&str, &str)]) -> (Child, LogStream) {
    let mut child = demo_command(env, extra)
        .spawn()
        .expect("spawn servicebusdemo");
    let logs = LogStream::attach(&mut child);
    (child, logs)
}

/// Reads log lines into `captured` until one contains `needle` and returns that line. Kills
/// `child` and fails the test, showing what was logged, when nothing arrives for 30 s.
pub fn wait_for_line(
    logs: &LogStream,
    child: &mut Child,
    captured: &mut String,
    needle: &str,
) -> String {
    loop {
        let Some(line) = logs.next_line(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("no {needle:?} in:\n{captured}");
        };
        captured.push_str(&line);
        captured.push('\n');
        if line.contains(needle) {
            return line;
        }
    }
}

/// Lines of a child's stdout and stderr, merged, as they come (logs may go to either).
pub struct LogStream {
    lines: mpsc::Receiver<String>,
}

impl LogStream {
    pub fn attach(child: &mut Child) -> Self {
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Self { lines: rx }
    }

    /// The next line, or `None` when both streams ended or nothing came for `wait`.
    pub fn next_line(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// The first line `wanted` accepts within `timeout`; `None` when both streams ended or
    /// the time is up.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline.checked_duration_since(Instant::now())?)?;
            if wanted(&line) {
                return Some(line);
            }
        }
    }

    /// Everything until both streams end.
    pub fn rest(self) -> Vec<String> {
        self.lines.iter().collect()
    }
}
