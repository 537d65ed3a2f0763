"""Interop between our `servicebusdemo` binary and Microsoft's azure-servicebus SDK, both
against sblocal: what our producer sends, the SDK reads (body, message_id, application
properties); what the SDK sends, our consumer consumes, dead-lettering what it cannot decode
with a reason the SDK reads back from the dead-letter queue.

The binary must have been built (`cargo build -p servicebusdemo`); set SERVICEBUSDEMO_BIN to
use another build."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
from typing import Dict, List

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "servicebusdemo"
RUN_TIMEOUT = 120


def demo_binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SERVICEBUSDEMO_BIN", DEFAULT_BIN))
    if not path.is_file():
        pytest.fail(
            f"servicebusdemo not found at {path}: build it with `cargo build -p servicebusdemo`",
            pytrace=False,
        )
    return path


def run_demo(env: Dict[str, str], **settings: str) -> subprocess.CompletedProcess:
    full = {
        "PATH": os.environ.get("PATH", ""),
        "LOG_FORMAT": "json",
        "RUST_LOG": "info",
        "METRICS_ADDR": "127.0.0.1:0",
    }
    full.update(env)
    full.update(settings)
    return subprocess.run(
        [str(demo_binary())],
        env=full,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def log_lines(result: subprocess.CompletedProcess) -> List[dict]:
    lines = []
    for text in (result.stdout, result.stderr):
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def received_ids(result: subprocess.CompletedProcess) -> List[str]:
    return [
        line["message_id"]
        for line in log_lines(result)
        if str(line.get("message", "")).startswith("Received message: ")
    ]


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_sdk_reads_what_our_producer_sends(sblocal):
    result = run_demo(
        sblocal.emulator_env,
        OPERATION_MODE="producer",
        MESSAGE_COUNT="25",
        MESSAGE_BODY="interop body",
    )
    assert result.returncode == 0, describe(result)

    with ServiceBusClient.from_connection_string(sblocal.connection_string) as sb:
        with sb.get_queue_receiver(sblocal.queue_name, max_wait_time=5) as receiver:
            got = []
            deadline = time.monotonic() + 10
            while len(got) < 25 and time.monotonic() < deadline:
                batch = receiver.receive_messages(max_message_count=25 - len(got), max_wait_time=2)
                for message in batch:
                    receiver.complete_message(message)
                got += batch

    assert len(got) == 25
    assert all(str(m) == "interop body" for m in got)
    ids = {m.message_id for m in got}
    assert len(ids) == 25, "unique message ids"
    indexes = sorted(int(m.application_properties[b"index"]) for m in got)
    assert indexes == list(range(25))
    assert all(m.application_properties[b"source"] == b"servicebusdemo" for m in got)
    assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 0


def test_our_consumer_takes_what_the_sdk_sends_and_dead_letters_undecodable(sblocal):
    with ServiceBusClient.from_connection_string(sblocal.connection_string) as sb:
        with sb.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(
                [ServiceBusMessage(f"from python {i}", message_id=f"py-{i}") for i in range(5)]
                + [ServiceBusMessage(b"\xff\xfe\x00not utf-8", message_id="py-binary")]
            )

    result = run_demo(
        sblocal.emulator_env,
        OPERATION_MODE="consumer",
        MESSAGE_COUNT="6",
        CONSUMER_IDLE_TIMEOUT="10s",
    )
    assert result.returncode == 0, describe(result)
    assert sorted(received_ids(result)) == sorted(f"py-{i}" for i in range(5)), describe(result)
    logged_bodies = {
        line["message"] for line in log_lines(result) if str(line.get("message", "")).startswith("Received")
    }
    assert logged_bodies == {f"Received message: from python {i}" for i in range(5)}

    with ServiceBusClient.from_connection_string(sblocal.connection_string) as sb:
        with sb.get_queue_receiver(
            sblocal.queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=5
        ) as dlq:
            dead = dlq.receive_messages(max_message_count=5, max_wait_time=5)
            for message in dead:
                dlq.complete_message(message)
    assert [m.message_id for m in dead] == ["py-binary"]
    assert dead[0].dead_letter_reason == "UndecodableBody"
    assert "UTF-8" in (dead[0].dead_letter_error_description or "")
    counts = sblocal.stats()["queues"][sblocal.queue_name]
    assert counts["active_messages"] == 0
    assert counts["dead_letter_messages"] == 0


def test_trace_context_travels_in_diagnostic_id(sblocal):
    # Trace export on (to an endpoint that is not there: spans are dropped, messages are not).
    result = run_demo(
        sblocal.emulator_env,
        OPERATION_MODE="producer",
        MESSAGE_COUNT="3",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert result.returncode == 0, describe(result)
    with ServiceBusClient.from_connection_string(sblocal.connection_string) as sb:
        with sb.get_queue_receiver(sblocal.queue_name, max_wait_time=5) as receiver:
            got = receiver.receive_messages(max_message_count=3, max_wait_time=5)
            for message in got:
                receiver.complete_message(message)
    assert len(got) == 3
    ids = {m.application_properties[b"Diagnostic-Id"].decode() for m in got}
    assert len(ids) == 1, "one producer run, one trace"
    version, trace_id, span_id, flags = ids.pop().split("-")
    assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01")

