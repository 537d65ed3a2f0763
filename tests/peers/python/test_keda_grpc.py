"""Our KEDA external scaler, called by a gRPC client generated at test time from KEDA's own
`externalscaler.proto` (grpcio-tools), against `sblocal` after our producer has sent messages.

The proto comes from `../shared/keda/externalscaler.proto` beside the repository (or KEDA_PROTO);
the messages are drained with Microsoft's azure-servicebus SDK, so no client side here is ours.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, Optional

import grpc
import pytest
from grpc_tools import protoc

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
KEDA_PROTO = pathlib.Path(
    os.environ.get("KEDA_PROTO", REPO_ROOT.parent / "shared" / "keda" / "externalscaler.proto")
)
SERVICEBUSDEMO_BIN = pathlib.Path(
    os.environ.get("SERVICEBUSDEMO_BIN", REPO_ROOT / "target" / "debug" / "servicebusdemo")
)
START_TIMEOUT_SECONDS = 30.0
PUSH_TIMEOUT_SECONDS = 30.0


# --- the generated client ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keda(tmp_path_factory):
    """`externalscaler_pb2` and `externalscaler_pb2_grpc`, generated from KEDA's proto now."""
    if not KEDA_PROTO.is_file():
        pytest.skip(f"KEDA's externalscaler.proto not found at {KEDA_PROTO} (set KEDA_PROTO)")
    out = tmp_path_factory.mktemp("keda_proto")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{KEDA_PROTO.parent}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(KEDA_PROTO),
        ]
    )
    assert status == 0, "grpc_tools.protoc failed on KEDA's proto"
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("externalscaler_pb2")
        pb2_grpc = importlib.import_module("externalscaler_pb2_grpc")
    finally:
        sys.path.remove(str(out))

    class Keda:
        messages = pb2
        stub_class = pb2_grpc.ExternalScalerStub

    return Keda


# --- our binaries ------------------------------------------------------------------------------


def servicebusdemo_binary() -> pathlib.Path:
    if not SERVICEBUSDEMO_BIN.is_file():
        pytest.fail(
            f"servicebusdemo not found at {SERVICEBUSDEMO_BIN}: build it first with "
            "`cargo build -p servicebusdemo` (or set SERVICEBUSDEMO_BIN)",
            pytrace=False,
        )
    return SERVICEBUSDEMO_BIN


def run_env(extra: Dict[str, str]) -> Dict[str, str]:
    """Only what the process needs: nothing from the developer's own Azure settings."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env.update(extra)
    return env


def produce(sblocal, count: int) -> None:
    result = subprocess.run(
        [str(servicebusdemo_binary()), "producer"],
        env=run_env(
            {
                **sblocal.emulator_env,
                "MESSAGE_COUNT": str(count),
                "METRICS_ADDR": "127.0.0.1:0",
                "LOG_FORMAT": "json",
            }
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


class Scaler:
    """`servicebusdemo scaler` on free ports; its addresses are read from its JSON logs."""

    def __init__(self, env: Dict[str, str]):
        self.process = subprocess.Popen(
            [str(servicebusdemo_binary()), "scaler"],
            env=run_env(
                {
                    **env,
                    "SCALER_GRPC_ADDR": "127.0.0.1:0",
                    "METRICS_ADDR": "127.0.0.1:0",
                    "LOG_FORMAT": "json",
                }
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.log: "queue.Queue[str]" = queue.Queue()
        self.lines = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.grpc_addr = self._wait_for_addr("externalscaler.ExternalScaler")

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            self.log.put(line)

    def _wait_for_addr(self, marker: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self.log.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if marker in event.get("message", "") and "addr" in event:
                return event["addr"]
        self.stop()
        pytest.fail(f"scaler did not start: {''.join(self.lines)}", pytrace=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_scaler() -> Iterator:
    started = []

    def start(env: Dict[str, str]) -> Scaler:
        scaler = Scaler(env)
        started.append(scaler)
        return scaler

    yield start
    for scaler in started:
        scaler.stop()


def scaled_object(keda, metadata: Dict[str, str]):
    return keda.messages.ScaledObjectRef(
        name="servicebusdemo-consumer", namespace="default", scalerMetadata=metadata
    )


def drain(sblocal, count: int) -> int:
    """Receive and complete up to `count` messages with Microsoft's SDK."""
    from azure.servicebus import ServiceBusClient

    received = 0
    with ServiceBusClient.from_connection_string(sblocal.connection_string) as client:
        with client.get_queue_receiver(sblocal.queue_name, max_wait_time=5) as receiver:
            while received < count:
                batch = receiver.receive_messages(max_message_count=count - received, max_wait_time=5)
                if not batch:
                    break
                for message in batch:
                    receiver.complete_message(message)
                received += len(batch)
    return received


def next_push(stream, timeout: float) -> Optional[bool]:
    """The next StreamIsActive value, or None if nothing arrives within `timeout`."""
    result: "queue.Queue" = queue.Queue()

    def read() -> None:
        try:
            result.put(next(stream).result)
        except Exception as error:  # the stream's own error, reported below
            result.put(error)

    threading.Thread(target=read, daemon=True).start()
    try:
        value = result.get(timeout=timeout)
    except queue.Empty:
        return None
    if isinstance(value, Exception):
        raise value
    return value


# --- tests -------------------------------------------------------------------------------------


def test_all_four_rpcs_match_the_queue(keda, sblocal, start_scaler):
    produce(sblocal, 23)
    scaler = start_scaler({**sblocal.emulator_env, "SCALER_CACHE_TTL": "200ms"})
    metadata = {"queueName": sblocal.queue_name, "messageCount": "10", "activationMessageCount": "0"}
    with grpc.insecure_channel(scaler.grpc_addr) as channel:
        stub = keda.stub_class(channel)
        ref = scaled_object(keda, metadata)

        spec = stub.GetMetricSpec(ref, timeout=10)
        assert len(spec.metricSpecs) == 1
        assert spec.metricSpecs[0].targetSizeFloat == 10.0
        metric_name = spec.metricSpecs[0].metricName
        assert metric_name

        metrics = stub.GetMetrics(
            keda.messages.GetMetricsRequest(scaledObjectRef=ref, metricName=metric_name), timeout=10
        )
        assert len(metrics.metricValues) == 1
        assert metrics.metricValues[0].metricValueFloat == 23.0
        assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 23

        assert stub.IsActive(ref, timeout=10).result is True

        stream = stub.StreamIsActive(ref, timeout=PUSH_TIMEOUT_SECONDS * 2)
        assert next_push(stream, PUSH_TIMEOUT_SECONDS) is True
        assert drain(sblocal, 23) == 23
        # Pushed on change, without anyone asking again.
        assert next_push(stream, PUSH_TIMEOUT_SECONDS) is False
        stream.cancel()

        assert stub.IsActive(ref, timeout=10).result is False
        drained = stub.GetMetrics(
            keda.messages.GetMetricsRequest(scaledObjectRef=ref, metricName=metric_name), timeout=10
        )
        assert drained.metricValues[0].metricValueFloat == 0.0


def test_bad_metadata_and_missing_queue_are_errors_keda_sees(keda, sblocal, start_scaler):
    scaler = start_scaler(sblocal.emulator_env)
    with grpc.insecure_channel(scaler.grpc_addr) as channel:
        stub = keda.stub_class(channel)
        for metadata, field in [
            ({}, "queueName"),
            ({"queueName": sblocal.queue_name, "messageCount": "ten"}, "messageCount"),
            ({"queueName": sblocal.queue_name, "namespace": "someone-else"}, "namespace"),
        ]:
            with pytest.raises(grpc.RpcError) as error:
                stub.GetMetricSpec(scaled_object(keda, metadata), timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in error.value.details()

        with pytest.raises(grpc.RpcError) as error:
            stub.IsActive(scaled_object(keda, {"queueName": "no-such-queue"}), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_scaler_with_workload_identity_uses_a_bearer_token(keda, sblocal, start_scaler):
    produce(sblocal, 7)
    # The scaler's own least-privilege identity (Data Owner: the ATOM endpoint needs Manage).
    env = sblocal.identity_env("servicebusdemo-scaler")
    env.pop("AZURE_SERVICEBUS_CONNECTION_STRING", None)
    scaler = start_scaler(env)
    with grpc.insecure_channel(scaler.grpc_addr) as channel:
        stub = keda.stub_class(channel)
        ref = scaled_object(keda, {"queueName": sblocal.queue_name})
        metrics = stub.GetMetrics(
            keda.messages.GetMetricsRequest(scaledObjectRef=ref, metricName="ignored"), timeout=30
        )
        assert metrics.metricValues[0].metricValueFloat == 7.0
    assert sblocal.stats()["tokens_issued"] >= 1


def test_receiver_only_identity_is_refused_by_the_management_endpoint(keda, sblocal, start_scaler):
    env = sblocal.identity_env("servicebusdemo-consumer")
    scaler = start_scaler(env)
    with grpc.insecure_channel(scaler.grpc_addr) as channel:
        stub = keda.stub_class(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.IsActive(scaled_object(keda, {"queueName": sblocal.queue_name}), timeout=30)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
