"""Observability checked with the real tools, against sblocal and the real `servicebusdemo` binary:

- a real Prometheus server scrapes the producer, the consumer and the scaler during a run, and the exact
  PromQL query that `k8s/overlays/prometheus` gives KEDA (read from `kubectl kustomize`) equals the
  queue depth while messages wait (as does the scaler's KEDA gRPC answer) and 0 once the consumer drained
  them; `promtool check metrics` accepts every endpoint; labels stay bounded; every PromQL expression of
  `dashboards/servicebusdemo.json` evaluates with `promtool query instant` against that Prometheus, and
  every metric it names was scraped;
- an OTLP/gRPC trace receiver (opentelemetry-proto types behind a grpcio server) gets the spans of each
  mode (`service.name` per mode unless OTEL_SERVICE_NAME says otherwise), the producer writes W3C
  `traceparent` and `Diagnostic-Id` into every message (read back with Microsoft's azure-servicebus SDK),
  the consumer's span of each message continues the trace found in either property, and the scaler
  traces each gRPC call;
- logs of full runs (SAS and workload identity, JSON and text) contain no key, signature, assertion or
  access token, and JSON lines inside spans carry the trace id.

Timings come from the environment (never asserted): OBS_SCRAPE_INTERVAL (Prometheus scrape and
file-discovery interval, default 1s), OBS_SCALER_CACHE_TTL (scaler poll period, default 250ms),
OBS_WAIT_SECONDS (bound on waiting for any one condition, default 90). PROMETHEUS_BIN and PROMTOOL_BIN
select other Prometheus builds; SERVICEBUSDEMO_BIN another servicebusdemo build.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Dict, List, Optional, Tuple

import grpc
import pytest
import yaml
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
DEFAULT_DEMO_BIN = REPO_ROOT / "target" / "debug" / "servicebusdemo"
DASHBOARD = REPO_ROOT / "dashboards" / "servicebusdemo.json"
EMULATOR_CONFIG = REPO_ROOT / "compose" / "Config.json"

SCRAPE_INTERVAL = os.environ.get("OBS_SCRAPE_INTERVAL", "1s")
SCALER_CACHE_TTL = os.environ.get("OBS_SCALER_CACHE_TTL", "250ms")
WAIT_SECONDS = float(os.environ.get("OBS_WAIT_SECONDS", "90"))

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{8,}")
SAS_SIGNATURE = re.compile(r"[?&;\s]sig=[A-Za-z0-9%+/=_-]{8,}")


# ------------------------------------------------------------------------------------------------
# Helpers: waiting, tools, the binary
# ------------------------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], object], timeout: float = WAIT_SECONDS):
    """Polls `probe` until it returns something truthy; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last value: {last!r}", pytrace=False)
        time.sleep(0.1)


def tool(name: str, env_var: str) -> str:
    path = os.environ.get(env_var) or shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: install Debian's `prometheus` package (or set {env_var})", pytrace=False)
    return path


def demo_binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SERVICEBUSDEMO_BIN", DEFAULT_DEMO_BIN))
    if not path.is_file():
        pytest.fail(
            f"servicebusdemo not found at {path}: build it with `cargo build -p servicebusdemo`",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], str]:
    """(status, headers with lower-case names, body) without raising on 4xx/5xx."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw_headers, body = response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        status, raw_headers, body = error.code, error.headers, error.read().decode()
    return status, {name.lower(): value for name, value in raw_headers.items()}, body


class Demo:
    """One `servicebusdemo` process; stdout and stderr go to files so every byte can be inspected."""

    def __init__(self, directory: pathlib.Path, name: str, env: Dict[str, str]):
        self.name = name
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        full = {
            "PATH": os.environ.get("PATH", ""),
            "LOG_FORMAT": "json",
            "RUST_LOG": "info",
            "METRICS_ADDR": "127.0.0.1:0",
            "SCALER_GRPC_ADDR": "127.0.0.1:0",
            "OPERATION_TIMEOUT": "120s",
            "RETRY_BASE_DELAY": "100ms",
            "RETRY_MAX_DELAY": "1s",
        }
        full.update(env)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [str(demo_binary())], env=full, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"{self.name} (exit {self.process.poll()}):\n{self.output()}"

    def metrics_addr(self) -> str:
        """The bound metrics address, from the `metrics address` log line (JSON or text)."""

        def probe():
            found = re.search(r'metrics_addr"?[:=]"?(127\.0\.0\.1:\d+)', self.output())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                pytest.fail(f"exited before serving metrics: {self.describe()}", pytrace=False)
            return None

        return wait_for(f"{self.name}'s metrics address", probe)

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"did not finish: {self.describe()}", pytrace=False)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def demos(tmp_path):
    started: List[Demo] = []

    def start(name: str, env: Dict[str, str]) -> Demo:
        demo = Demo(tmp_path, name, env)
        started.append(demo)
        return demo

    start.started = started  # type: ignore[attr-defined]
    yield start
    for demo in started:
        demo.kill()


def json_lines(text: str) -> List[dict]:
    lines = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


# ------------------------------------------------------------------------------------------------
# What the manifests say
# ------------------------------------------------------------------------------------------------


def kustomize(overlay: str) -> List[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl not found (needed for `kubectl kustomize`)", pytrace=False)
    rendered = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / overlay)], capture_output=True, text=True, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def keda_prometheus_trigger() -> Tuple[str, str]:
    """(the PromQL query KEDA runs, the queue the scaler watches) from k8s/overlays/prometheus."""
    documents = kustomize("k8s/overlays/prometheus")
    queries = [
        trigger["metadata"]["query"]
        for doc in documents
        if doc.get("kind") == "ScaledObject"
        for trigger in doc["spec"]["triggers"]
        if trigger.get("type") == "prometheus"
    ]
    assert len(queries) == 1, f"expected one prometheus trigger, found {queries}"
    scaler_queues = [
        env["value"]
        for doc in documents
        if doc.get("kind") == "Deployment"
        and doc["metadata"]["labels"].get("app.kubernetes.io/component") == "scaler"
        for container in doc["spec"]["template"]["spec"]["containers"]
        for env in container.get("env", [])
        if env["name"] == "AZURE_SERVICEBUS_QUEUE_NAME"
    ]
    assert len(scaler_queues) == 1, scaler_queues
    return queries[0], scaler_queues[0]


def emulator_config_with_queue(path: pathlib.Path, queue: str) -> pathlib.Path:
    """The project's emulator Config.json with its one queue named `queue`."""
    config = json.loads(EMULATOR_CONFIG.read_text())
    config["UserConfig"]["Namespaces"][0]["Queues"][0]["Name"] = queue
    path.write_text(json.dumps(config))
    return path


# ------------------------------------------------------------------------------------------------
# Prometheus
# ------------------------------------------------------------------------------------------------


class Prometheus:
    """A real Prometheus server; each job discovers its targets from a file the test rewrites."""

    JOBS = ("producer", "consumer", "scaler")

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = tool("prometheus", "PROMETHEUS_BIN")
        for job in self.JOBS:
            self.set_targets(job, [])
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
            "scrape_configs": [
                {
                    "job_name": job,
                    "file_sd_configs": [
                        {"files": [str(self.dir / f"targets-{job}.json")], "refresh_interval": SCRAPE_INTERVAL}
                    ],
                }
                for job in self.JOBS
            ],
        }
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: Optional[subprocess.Popen] = None
        for _ in range(5):  # a port picked free can be taken before Prometheus binds it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            if self._start():
                return
        pytest.fail(f"Prometheus did not start: {self.log()}", pytrace=False)

    def _start(self) -> bool:
        self.log_path = self.dir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if http_get(f"{self.url}/-/ready")[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def set_targets(self, job: str, addresses: List[str]) -> None:
        # Written then renamed, so the file watcher never reads half a file.
        staging = self.dir / f".targets-{job}.json"
        staging.write_text(json.dumps([{"targets": addresses, "labels": {}}] if addresses else []))
        staging.replace(self.dir / f"targets-{job}.json")

    def query(self, expr: str) -> List[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, _, body = http_get(url)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}: {body}"
        return answer["data"]["result"]

    def value(self, expr: str) -> Optional[float]:
        """The value of a query that yields one sample (None when it yields nothing)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} yields several series: {result}"
        return float(result[0]["value"][1]) if result else None

    def series_exist(self, metric: str) -> bool:
        url = f"{self.url}/api/v1/series?" + urllib.parse.urlencode(
            {"match[]": f'{{__name__="{metric}"}}', "start": "0"}
        )
        status, _, body = http_get(url)
        assert status == 200, body
        return bool(json.loads(body)["data"])

    def label_names(self, selector: str) -> set:
        url = f"{self.url}/api/v1/series?" + urllib.parse.urlencode({"match[]": selector, "start": "0"})
        status, _, body = http_get(url)
        assert status == 200, body
        return {name for series in json.loads(body)["data"] for name in series}

    def target_up(self, job: str) -> bool:
        return self.value(f'max(up{{job="{job}"}})') == 1.0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def prometheus(tmp_path):
    server = Prometheus(tmp_path / "prometheus")
    yield server
    server.stop()


def promtool_check_metrics(address: str) -> str:
    """Scrapes `address` as curl would (text format) and lints it with `promtool check metrics`."""
    status, headers, body = http_get(f"http://{address}/metrics")
    assert status == 200, body
    assert headers.get("content-type", "").startswith("text/plain; version=0.0.4"), headers
    checked = subprocess.run(
        [tool("promtool", "PROMTOOL_BIN"), "check", "metrics"],
        input=body,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), (
        f"promtool check metrics on {address}:\n{checked.stdout}{checked.stderr}\n---\n{body}"
    )
    # Prometheus itself asks for OpenMetrics; that variant has its own content type and `# EOF`.
    status, headers, openmetrics = http_get(
        f"http://{address}/metrics", {"Accept": "application/openmetrics-text;version=1.0.0"}
    )
    assert status == 200
    assert headers.get("content-type", "").startswith("application/openmetrics-text; version=1.0.0"), headers
    assert openmetrics.endswith("# EOF\n")
    return body


# ------------------------------------------------------------------------------------------------
# A TCP proxy that holds a client mid-run
# ------------------------------------------------------------------------------------------------


class PausingProxy:
    """Forwards TCP to `upstream`; once `pause_after` bytes went from clients to the server, holds
    that direction until `release()`. The server's answers keep flowing, so everything sent before the
    pause is acknowledged: a producer is held alive with part of its messages accepted."""

    def __init__(self, upstream: Tuple[str, int], pause_after: int):
        self.upstream = upstream
        self.pause_after = pause_after
        self.forwarded = 0
        self.paused = threading.Event()
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, to_server: bool) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if to_server:
                    self._hold_if_due(len(chunk))
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _hold_if_due(self, size: int) -> None:
        with self.lock:
            self.forwarded += size
            due = self.forwarded >= self.pause_after and not self.released.is_set()
        if due:
            self.paused.set()
            self.released.wait()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.listener.close()


# ------------------------------------------------------------------------------------------------
# OTLP trace receiver
# ------------------------------------------------------------------------------------------------


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC trace receiver keeping every span with its resource's service.name."""

    def __init__(self):
        self.spans: List[dict] = []
        self.lock = threading.Lock()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):  # noqa: N802 (the gRPC method name)
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        attribute.value.string_value
                        for attribute in resource_spans.resource.attributes
                        if attribute.key == "service.name"
                    ),
                    None,
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "service": service,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                            }
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def summary(self) -> List[Tuple[Optional[str], str, str, str]]:
        """(service, name, trace id, parent span id) of every span, for failure messages."""
        with self.lock:
            return [(s["service"], s["name"], s["trace_id"], s["parent_span_id"]) for s in self.spans]

    def of(self, service: str) -> List[dict]:
        with self.lock:
            return [span for span in self.spans if span["service"] == service]

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def trace_receiver():
    receiver = TraceReceiver()
    yield receiver
    receiver.stop()


def receive_all(connection_string: str, queue: str, count: int) -> list:
    """Receives and completes `count` messages with Microsoft's SDK."""
    got: list = []
    with ServiceBusClient.from_connection_string(connection_string) as client:
        with client.get_queue_receiver(queue, max_wait_time=5) as receiver:
            deadline = time.monotonic() + WAIT_SECONDS
            while len(got) < count and time.monotonic() < deadline:
                batch = receiver.receive_messages(max_message_count=count - len(got), max_wait_time=2)
                for message in batch:
                    receiver.complete_message(message)
                got += batch
    return got


def property_text(message, name: str) -> Optional[str]:
    properties = message.application_properties or {}
    value = properties.get(name.encode(), properties.get(name))
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def externalscaler(tmp_path_factory):
    """(messages, stub class) generated now from the repository's externalscaler.proto."""
    import importlib
    import sys

    from grpc_tools import protoc

    proto = REPO_ROOT / "proto" / "externalscaler.proto"
    out = tmp_path_factory.mktemp("externalscaler")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["protoc", f"-I{proto.parent}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto)]
    )
    assert status == 0, "grpc_tools.protoc failed"
    sys.path.insert(0, str(out))
    try:
        messages = importlib.import_module("externalscaler_pb2")
        services = importlib.import_module("externalscaler_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return messages, services.ExternalScalerStub


# ------------------------------------------------------------------------------------------------
# Prometheus, KEDA's query, promtool, the dashboard
# ------------------------------------------------------------------------------------------------


def dashboard_expressions() -> List[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    for panel in panels:
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return [target["expr"] for panel in panels for target in panel.get("targets", []) if target.get("expr")]


def concrete(expr: str, queue: str) -> str:
    """A dashboard expression with Grafana's variables filled in as Grafana would."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("${queue}", queue)
        .replace("$queue", re.escape(queue))
    )


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
    expressions = " ".join(dashboard_expressions())
    for needed in (
        "servicebusdemo_messages_sent_total",
        "servicebusdemo_messages_settled_total",
        "servicebusdemo_send_duration_seconds_bucket",
        "servicebusdemo_processing_duration_seconds_bucket",
        "servicebusdemo_queue_active_messages",
        "servicebusdemo_build_info",
    ):
        assert needed in expressions, f"the dashboard shows {needed}"


def scaler_grpc_addr(scaler: Demo) -> str:
    return wait_for(
        "the scaler's gRPC address",
        lambda: (re.search(r'grpc_addr"?[:=]"?(127\.0\.0\.1:\d+)', scaler.output()) or [None, None])[1],
    )


def external_scaler_metric(externalscaler, address: str, queue: str) -> float:
    """What KEDA's external-scaler trigger would read: GetMetricSpec, then GetMetrics."""
    messages, stub_class = externalscaler
    reference = messages.ScaledObjectRef(
        name="consumer", namespace="default", scalerMetadata={"queueName": queue, "messageCount": "10"}
    )
    with grpc.insecure_channel(address) as channel:
        stub = stub_class(channel)
        spec = stub.GetMetricSpec(reference, timeout=10)
        values = stub.GetMetrics(
            messages.GetMetricsRequest(scaledObjectRef=reference, metricName=spec.metricSpecs[0].metricName),
            timeout=10,
        )
    assert len(values.metricValues) == 1, values
    return values.metricValues[0].metricValueFloat


def test_prometheus_scrapes_every_mode_and_keda_query_follows_the_queue(
    tmp_path, sblocal_factory, prometheus, demos, externalscaler
):
    keda_query, queue = keda_prometheus_trigger()
    broker = sblocal_factory(config=emulator_config_with_queue(tmp_path / "Config.json", queue))
    assert broker.queue_name == queue
    # Workload identity, as the tutorial deploys it: token requests are recorded too.
    identity_env = {**broker.workload_env, "AZURE_SERVICEBUS_QUEUE_NAME": queue}

    scaler = demos("scaler", {**identity_env, "OPERATION_MODE": "scaler", "SCALER_CACHE_TTL": SCALER_CACHE_TTL})
    prometheus.set_targets("scaler", [scaler.metrics_addr()])
    wait_for("Prometheus to scrape the scaler", lambda: prometheus.target_up("scaler"))
    assert wait_for("KEDA's query on the empty queue", lambda: prometheus.query(keda_query)) and (
        prometheus.value(keda_query) == 0
    )

    # The producer is held by a proxy after about half its bytes, so Prometheus sees it mid-run.
    message_count, message_size = 40, 32 * 1024
    proxy = PausingProxy(("127.0.0.1", broker.amqps_port), pause_after=message_count * message_size // 2)
    try:
        producer = demos(
            "producer",
            {
                **identity_env,
                "OPERATION_MODE": "producer",
                "AZURE_SERVICEBUS_HOSTNAME": f"localhost:{proxy.port}",
                "MESSAGE_COUNT": str(message_count),
                "MESSAGE_SIZE": str(message_size),
            },
        )
        producer_addr = producer.metrics_addr()
        prometheus.set_targets("producer", [producer_addr])
        wait_for("the producer to be held mid-run", lambda: proxy.paused.wait(0.1))
        sent_mid_run = wait_for(
            "Prometheus to scrape the producer's first accepted batch",
            lambda: prometheus.value('sum(servicebusdemo_messages_sent_total{job="producer"})'),
        )
        assert 0 < sent_mid_run < message_count, sent_mid_run
        assert producer.process.poll() is None
        promtool_check_metrics(producer_addr)
        assert prometheus.value('servicebusdemo_build_info{job="producer",mode="producer"}') == 1
    finally:
        proxy.close()
    assert producer.wait() == 0, producer.describe()

    # Messages wait: KEDA's query equals the queue depth the broker reports.
    assert broker.stats()["queues"][queue]["active_messages"] == message_count
    wait_for(f"KEDA's query to reach {message_count}", lambda: prometheus.value(keda_query) == message_count)
    # The external-scaler overlay's path (KEDA calling the scaler) reports the same depth.
    assert external_scaler_metric(externalscaler, scaler_grpc_addr(scaler), queue) == message_count
    promtool_check_metrics(scaler.metrics_addr())

    # A continuous consumer drains the queue; it stays up to be scraped until stopped.
    consumer = demos(
        "consumer",
        {**identity_env, "OPERATION_MODE": "consumer", "MESSAGE_COUNT": "0", "PROCESSING_DELAY": "10ms"},
    )
    consumer_addr = consumer.metrics_addr()
    prometheus.set_targets("consumer", [consumer_addr])
    wait_for(
        "Prometheus to see every message completed",
        lambda: prometheus.value(
            'sum(servicebusdemo_messages_settled_total{job="consumer",outcome="completed"})'
        )
        == message_count,
    )
    assert broker.stats()["queues"][queue]["active_messages"] == 0
    wait_for("KEDA's query to fall to 0", lambda: prometheus.value(keda_query) == 0)
    promtool_check_metrics(consumer_addr)
    assert prometheus.value(f'sum(servicebusdemo_messages_received_total{{job="consumer",queue="{queue}"}})') == (
        message_count
    )
    # The producer finished (its series are stale now); the others are still scraped.
    for job in ("consumer", "scaler"):
        assert prometheus.value(f'servicebusdemo_build_info{{job="{job}",mode="{job}"}}') == 1, job

    # Bounded labels only: never a message id or anything else per message.
    labels = prometheus.label_names('{__name__=~"servicebusdemo_.+"}')
    allowed = {"__name__", "job", "instance", "queue", "mode", "outcome", "version", "le"}
    assert labels and labels <= allowed, f"unexpected labels: {labels - allowed}"

    # Every panel of the dashboard: valid PromQL that evaluates, over metrics this scrape has.
    promtool = tool("promtool", "PROMTOOL_BIN")
    for expr in dashboard_expressions():
        query = concrete(expr, queue)
        evaluated = subprocess.run(
            [promtool, "query", "instant", prometheus.url, query], capture_output=True, text=True, check=False
        )
        assert evaluated.returncode == 0, f"{query}\n{evaluated.stdout}{evaluated.stderr}"
        for metric in set(re.findall(r"\b(servicebusdemo_[a-z_]+)\b", query)):
            assert prometheus.series_exist(metric), f"{metric} (in {expr!r}) was never scraped"

    assert consumer.stop() == 0, consumer.describe()
    assert scaler.stop() == 0, scaler.describe()


# ------------------------------------------------------------------------------------------------
# Logs: no secrets; trace ids
# ------------------------------------------------------------------------------------------------


def sas_token(resource: str, key_name: str, key: str, expiry: int) -> str:
    """A Service Bus SAS token as the documented scheme builds it (HMAC-SHA256 of the encoded
    resource and expiry), to show the signature pattern recognises real ones."""
    import hashlib
    import hmac

    encoded = urllib.parse.quote_plus(resource)
    digest = hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}&skn={key_name}"


def secrets_of(broker, auth: str) -> Dict[str, str]:
    """The secret values a run with `auth` handles, by what they are."""
    if auth == "sas":
        connection = dict(
            part.split("=", 1) for part in broker.connection_string.split(";") if "=" in part
        )
        key = connection["SharedAccessKey"]
        example = sas_token(f"sb://localhost/{broker.queue_name}", connection["SharedAccessKeyName"], key, 1)
        assert SAS_SIGNATURE.search(example), example
        return {
            "SAS key": key,
            "SAS key (URL-encoded)": urllib.parse.quote(key, safe=""),
            "SAS key (decoded bytes, base64url)": base64.urlsafe_b64encode(base64.b64decode(key)).decode(),
        }
    assertion = pathlib.Path(broker.workload_env["AZURE_FEDERATED_TOKEN_FILE"]).read_text().strip()
    header_and_claims, _, signature = assertion.rpartition(".")
    return {
        "federated assertion": assertion,
        "federated assertion signature": signature,
        "federated assertion claims": header_and_claims,
    }


def full_run(demos, env: Dict[str, str], log_format: str, message_count: int) -> List[Demo]:
    """Scaler, producer, then consumer of `message_count` messages; every process exits 0."""
    common = {**env, "LOG_FORMAT": log_format, "RUST_LOG": os.environ.get("OBS_RUST_LOG", "info")}
    scaler = demos(f"scaler-{log_format}", {**common, "OPERATION_MODE": "scaler", "SCALER_CACHE_TTL": SCALER_CACHE_TTL})
    scaler.metrics_addr()
    producer = demos(
        f"producer-{log_format}", {**common, "OPERATION_MODE": "producer", "MESSAGE_COUNT": str(message_count)}
    )
    assert producer.wait() == 0, producer.describe()
    consumer = demos(
        f"consumer-{log_format}",
        {**common, "OPERATION_MODE": "consumer", "MESSAGE_COUNT": str(message_count), "CONSUMER_IDLE_TIMEOUT": "30s"},
    )
    assert consumer.wait() == 0, consumer.describe()
    # The scaler polled the queue meanwhile (its token path included); then it is stopped.
    assert scaler.stop() == 0, scaler.describe()
    return [scaler, producer, consumer]


def issued_access_token(monkeypatch, broker) -> str:
    """An access token the broker's token endpoint issues for the run's identity, taken the way
    Microsoft's SDK takes it: it shows what the run's own tokens look like."""
    from azure.identity import WorkloadIdentityCredential

    for key, value in broker.workload_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", broker.ca_file)
    return WorkloadIdentityCredential().get_token("https://servicebus.azure.net/.default").token


@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.parametrize("auth", ["sas", "workload-identity"])
def test_logs_of_a_full_run_contain_no_secrets(monkeypatch, sblocal, demos, auth, log_format):
    env = dict(sblocal.emulator_env if auth == "sas" else sblocal.workload_env)
    processes = full_run(demos, env, log_format, message_count=20)
    assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 0

    secrets = secrets_of(sblocal, auth)
    if auth == "workload-identity":
        assert sblocal.stats()["tokens_issued"] > 0, "the run exchanged the assertion for access tokens"
        access_token = issued_access_token(monkeypatch, sblocal)
        # The run's own tokens have this shape; the JWT pattern below must recognise it.
        assert JWT.search(access_token), "the JWT pattern covers the issued access tokens"
        assert JWT.search(secrets["federated assertion"]), "and the federated assertion"
        secrets["access token signature"] = access_token.rpartition(".")[2]
    for process in processes:
        output = process.output()
        assert output.strip(), f"{process.name} logged something"
        for what, value in secrets.items():
            assert value not in output, f"{process.name} logged the {what}"
        for pattern, what in ((JWT, "a JWT (assertion or access token)"), (SAS_SIGNATURE, "a SAS signature")):
            leaked = pattern.search(output)
            assert not leaked, f"{process.name} logged {what}: {leaked.group(0)[:24]}..."
        assert "SharedAccessSignature sr=" not in output, f"{process.name} logged a SAS token"
        assert not re.search(r"Bearer\s+\S{16,}", output), f"{process.name} logged a bearer token"
        if log_format == "json":
            lines = output.splitlines()
            parsed = json_lines(output)
            assert len(parsed) == len([line for line in lines if line.strip()]), f"{process.name}: every line is JSON"


def test_json_log_lines_carry_trace_ids(sblocal, demos):
    """Lines logged inside a span carry its trace id; the producer's `Sent` and the consumer's
    `Received message` lines are logged inside the send and process spans."""
    processes = full_run(demos, dict(sblocal.emulator_env), "json", message_count=10)
    for process in processes:
        for line in json_lines(process.output()):
            if "span" in line:
                assert re.fullmatch(r"[0-9a-f]{32}", str(line.get("trace_id", ""))), (process.name, line)
    _, producer, consumer = processes
    sent = [line for line in json_lines(producer.output()) if str(line.get("message", "")).startswith("Sent ")]
    received = [
        line for line in json_lines(consumer.output()) if str(line.get("message", "")).startswith("Received message")
    ]
    assert sent and received
    missing = [line for line in sent + received if "trace_id" not in line]
    assert not missing, f"lines without trace_id (not logged inside a span): {missing[:3]}"


# ------------------------------------------------------------------------------------------------
# Traces over OTLP
# ------------------------------------------------------------------------------------------------


def test_producer_exports_spans_and_writes_traceparent_into_every_message(sblocal, demos, trace_receiver):
    message_count = 12
    producer = demos(
        "producer",
        {
            **sblocal.emulator_env,
            "OPERATION_MODE": "producer",
            "MESSAGE_COUNT": str(message_count),
            "OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
        },
    )
    assert producer.wait() == 0, producer.describe()
    # The process flushes its spans before it exits.
    spans = trace_receiver.of("servicebusdemo-producer")
    assert spans, f"no span exported by servicebusdemo-producer; all: {trace_receiver.summary()}"
    span_ids = {span["span_id"] for span in spans}

    messages = receive_all(sblocal.connection_string, sblocal.queue_name, message_count)
    assert len(messages) == message_count
    for message in messages:
        traceparent = property_text(message, "traceparent")
        diagnostic_id = property_text(message, "Diagnostic-Id")
        assert traceparent and TRACEPARENT.match(traceparent), (
            f"message {message.message_id}: application property traceparent = {traceparent!r}"
        )
        assert diagnostic_id == traceparent, f"Diagnostic-Id {diagnostic_id!r} != traceparent {traceparent!r}"
        trace_id, parent_id = TRACEPARENT.match(traceparent).groups()
        assert parent_id in span_ids, f"{traceparent} names a span the producer did not export"
        assert trace_id in {span["trace_id"] for span in spans}


@pytest.mark.parametrize(
    "carriers",
    [("traceparent", "Diagnostic-Id"), ("traceparent",), ("Diagnostic-Id",)],
    ids=["both", "traceparent-only", "diagnostic-id-only"],
)
def test_consumer_continues_the_trace_of_each_message(sblocal, demos, trace_receiver, carriers):
    """Messages sent by Microsoft's SDK with the trace context in the properties an instrumented
    Azure client (`Diagnostic-Id`) or any OpenTelemetry W3C producer (`traceparent`) writes."""
    parents = {}
    with ServiceBusClient.from_connection_string(sblocal.connection_string) as client:
        with client.get_queue_sender(sblocal.queue_name) as sender:
            batch = []
            for index in range(6):
                trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
                traceparent = f"00-{trace_id}-{span_id}-01"
                parents[f"traced-{index}"] = (trace_id, span_id)
                batch.append(
                    ServiceBusMessage(
                        f"traced {index}",
                        message_id=f"traced-{index}",
                        application_properties={carrier: traceparent for carrier in carriers},
                    )
                )
            sender.send_messages(batch)

    consumer = demos(
        "consumer",
        {
            **sblocal.emulator_env,
            "OPERATION_MODE": "consumer",
            "MESSAGE_COUNT": str(len(parents)),
            "CONSUMER_IDLE_TIMEOUT": "30s",
            "OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
        },
    )
    assert consumer.wait() == 0, consumer.describe()
    spans = trace_receiver.of("servicebusdemo-consumer")
    assert spans, f"no span exported by servicebusdemo-consumer; all: {trace_receiver.summary()}"
    continued = {(span["trace_id"], span["parent_span_id"]) for span in spans}
    missing = {message_id: parent for message_id, parent in parents.items() if parent not in continued}
    assert not missing, (
        f"no consumer span continues the trace of {sorted(missing)}; spans: {trace_receiver.summary()}"
    )


def test_a_message_can_be_followed_from_producer_to_consumer(sblocal, demos, trace_receiver):
    message_count = 10
    common = {**sblocal.emulator_env, "OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint}
    producer = demos("producer", {**common, "OPERATION_MODE": "producer", "MESSAGE_COUNT": str(message_count)})
    assert producer.wait() == 0, producer.describe()
    consumer = demos(
        "consumer",
        {**common, "OPERATION_MODE": "consumer", "MESSAGE_COUNT": str(message_count), "CONSUMER_IDLE_TIMEOUT": "30s"},
    )
    assert consumer.wait() == 0, consumer.describe()

    produced = trace_receiver.of("servicebusdemo-producer")
    consumed = trace_receiver.of("servicebusdemo-consumer")
    assert produced and consumed, (
        f"spans by service: producer {len(produced)}, consumer {len(consumed)}; all: {trace_receiver.summary()}"
    )
    producer_spans = {span["span_id"]: span for span in produced}
    children = [span for span in consumed if span["parent_span_id"] in producer_spans]
    assert len(children) >= message_count, (
        f"{len(children)} consumer spans continue a producer span; want one per message ({message_count})"
    )
    for child in children:
        assert child["trace_id"] == producer_spans[child["parent_span_id"]]["trace_id"]


def test_standard_otel_service_name_overrides_the_per_mode_name(sblocal, demos, trace_receiver):
    producer = demos(
        "producer",
        {
            **sblocal.emulator_env,
            "OPERATION_MODE": "producer",
            "MESSAGE_COUNT": "3",
            "OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
            "OTEL_SERVICE_NAME": "orders-producer",
        },
    )
    assert producer.wait() == 0, producer.describe()
    services = {span["service"] for span in trace_receiver.spans}
    assert services == {"orders-producer"}, trace_receiver.summary()


def test_scaler_exports_a_span_per_call_and_logs_its_trace_id(sblocal, demos, trace_receiver, externalscaler):
    messages, stub_class = externalscaler
    scaler = demos(
        "scaler",
        {
            **sblocal.emulator_env,
            "OPERATION_MODE": "scaler",
            "SCALER_CACHE_TTL": SCALER_CACHE_TTL,
            "OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
        },
    )
    grpc_addr = scaler_grpc_addr(scaler)
    reference = messages.ScaledObjectRef(
        name="consumer",
        namespace="default",
        scalerMetadata={"queueName": sblocal.queue_name, "messageCount": "10"},
    )
    with grpc.insecure_channel(grpc_addr) as channel:
        stub = stub_class(channel)
        assert not stub.IsActive(reference, timeout=10).result
        spec = stub.GetMetricSpec(reference, timeout=10)
        stub.GetMetrics(
            messages.GetMetricsRequest(scaledObjectRef=reference, metricName=spec.metricSpecs[0].metricName),
            timeout=10,
        )
        # A refused call is logged inside its span.
        with pytest.raises(grpc.RpcError) as refused:
            stub.IsActive(messages.ScaledObjectRef(name="consumer", namespace="default"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert scaler.stop() == 0, scaler.describe()

    spans = trace_receiver.of("servicebusdemo-scaler")
    assert len({span["trace_id"] for span in spans}) >= 4, f"a trace per call: {trace_receiver.summary()}"
    logged = [line for line in json_lines(scaler.output()) if "span" in line]
    assert logged, f"no line logged inside a call's span: {scaler.output()}"
    for line in logged:
        assert line.get("trace_id") in {span["trace_id"] for span in spans}, (line, trace_receiver.summary())
