//! The `sblocal` binary as a process: `serve` with OS-chosen ports becomes ready, writes its files,
//! answers `/health`, mints tokens with `token`, refuses bad configuration with exit code 2 and
//! stops cleanly on SIGTERM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_sblocal");

struct Served {
    child: Child,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--dir"])
        .arg(dir)
        .args([
            "--amqp",
            "127.0.0.1:0",
            "--amqps",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sblocal starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "ready" {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("sblocal prints ready");
    Served { child }
}

fn env_file(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .expect("env file written")
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn port_of(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("url has a port")
}

fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

#[test]
fn serve_writes_its_files_answers_health_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut served = serve(dir.path(), &[]);

    let emulator = env_file(&dir.path().join("emulator.env"));
    let connection_string = &emulator["AZURE_SERVICEBUS_CONNECTION_STRING"];
    assert!(connection_string.starts_with("Endpoint=sb://localhost:"));
    assert!(connection_string.contains(";SharedAccessKeyName=RootManageSharedAccessKey;"));
    assert!(connection_string.ends_with(";UseDevelopmentEmulator=true"));
    assert_eq!(emulator["AZURE_SERVICEBUS_QUEUE_NAME"], "queue.1");
    let workload = env_file(&dir.path().join("workload.env"));
    for key in [
        "AZURE_SERVICEBUS_HOSTNAME",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_AUTHORITY_HOST",
        "AZURE_FEDERATED_TOKEN_FILE",
        "SSL_CERT_FILE",
        "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT",
    ] {
        assert!(workload.contains_key(key), "workload.env lacks {key}");
    }
    assert!(std::fs::read_to_string(&workload["SSL_CERT_FILE"])
        .expect("ca.pem")
        .starts_with("-----BEGIN CERTIFICATE-----"));

    let http_port = port_of(&emulator["AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT"]);
    let health = http_get(http_port, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok"), "{health}");

    let token = Command::new(BIN)
        .args(["token", "--dir"])
        .arg(dir.path())
        .args(["--sub", "system:serviceaccount:default:servicebusdemo"])
        .output()
        .expect("token runs");
    assert!(token.status.success());
    assert_eq!(
        String::from_utf8_lossy(&token.stdout)
            .trim()
            .split('.')
            .count(),
        3
    );

    let killed = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = served.child.wait().expect("exits");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn bad_configuration_exits_2_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("Config.json");
    std::fs::write(
        &config,
        r#"{"UserConfig":{"Namespaces":[{"Name":"ns","Queues":[{"Name":"q","Properties":{"RequiresSession":true}}]}]}}"#,
    )
    .expect("write config");
    let output = Command::new(BIN)
        .args(["serve", "--dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--config") && stderr.contains("RequiresSession"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
    assert!(!dir.path().join("emulator.env").exists());
}
