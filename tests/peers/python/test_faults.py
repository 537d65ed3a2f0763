"""Fault injection through /$admin/ on the plain HTTP port: each switch is shown to reach
Microsoft's SDK (it sees the fault) and to end (the SDK recovers)."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error

import pytest
import requests
from azure.identity import WorkloadIdentityCredential
from azure.servicebus import ServiceBusClient, ServiceBusMessage, TransportType
from azure.servicebus.exceptions import (
    MessageLockLostError,
    ServiceBusError,
    ServiceBusServerBusyError,
)

SCOPE = "https://servicebus.azure.net/.default"


def client(sblocal, retry_total: int = 0) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(
        sblocal.connection_string, retry_total=retry_total, retry_backoff_factor=0.2
    )


def active(sblocal) -> int:
    return sblocal.stats()["queues"][sblocal.queue_name]["active_messages"]


def wait_until(condition, what: str, attempts: int = 100, pause: float = 0.1) -> None:
    for _ in range(attempts):
        if condition():
            return
        time.sleep(pause)
    pytest.fail(f"timed out waiting for {what}")


def within(seconds: float, action, what: str):
    """Runs `action` in a daemon thread; a hang fails the test instead of the whole suite."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"{what} did not finish within {seconds} s", pytrace=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# --- the routes themselves --------------------------------------------------------------------


def test_admin_routes_check_their_input(sblocal):
    with pytest.raises(urllib.error.HTTPError) as missing:
        sblocal.admin("refuse-connections")
    assert missing.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as negative:
        sblocal.admin("server-busy", seconds=-1)
    assert negative.value.code == 400
    assert requests.get(f"{sblocal.http_url}/$admin/drop-connections", timeout=10).status_code == 405


def test_admin_routes_are_not_served_over_https(sblocal):
    response = requests.post(
        f"{sblocal.https_url}/$admin/refuse-connections?seconds=5", verify=sblocal.ca_file, timeout=10
    )
    assert response.status_code in (404, 405)
    assert sblocal.stats()["refusing_connections_for_seconds"] == 0


def test_stats_report_counters_and_queues(sblocal):
    stats = sblocal.stats()
    assert stats["atom_requests"] == 0
    assert stats["amqp_connections"] == 0
    assert stats["queues"][sblocal.queue_name]["active_messages"] == 0
    sblocal.admin("refuse-connections", seconds=60)
    assert 0 < sblocal.stats()["refusing_connections_for_seconds"] <= 60
    sblocal.admin("refuse-connections", seconds=0)
    assert sblocal.stats()["refusing_connections_for_seconds"] == 0


# --- token lifetime (the Entra side; no broker needed) ---------------------------------------


def test_token_lifetime_switch_shortens_new_tokens_and_resets(monkeypatch, sblocal):
    for key, value in sblocal.workload_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sblocal.ca_file)
    sblocal.admin("token-lifetime", seconds=5)
    short = claims_of(WorkloadIdentityCredential().get_token(SCOPE).token)
    assert short["exp"] - short["iat"] == 5
    sblocal.admin("token-lifetime", seconds=0)
    normal = claims_of(WorkloadIdentityCredential().get_token(SCOPE).token)
    assert normal["exp"] - normal["iat"] == 3600


# --- faults the SDK must see and survive (needs the AMQP broker) ------------------------------


def test_refused_connections_fail_then_recover(sblocal):
    sblocal.admin("refuse-connections", seconds=60)
    with client(sblocal) as refused, pytest.raises(ServiceBusError):
        with refused.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(ServiceBusMessage("refused"))
    assert sblocal.stats()["amqp_connections_refused"] >= 1
    sblocal.admin("refuse-connections", seconds=0)
    with client(sblocal) as recovered, recovered.get_queue_sender(sblocal.queue_name) as sender:
        sender.send_messages(ServiceBusMessage("accepted"))
    assert active(sblocal) == 1


def test_refusal_window_ends_by_itself(sblocal):
    sblocal.admin("refuse-connections", seconds=1)
    wait_until(lambda: sblocal.stats()["refusing_connections_for_seconds"] == 0, "the window to end")
    with client(sblocal) as recovered, recovered.get_queue_sender(sblocal.queue_name) as sender:
        sender.send_messages(ServiceBusMessage("after the window"))
    assert active(sblocal) == 1


def test_dropped_connections_are_reestablished(sblocal):
    with client(sblocal, retry_total=3) as sb, sb.get_queue_sender(sblocal.queue_name) as sender:
        sender.send_messages(ServiceBusMessage("before"))
        connections = sblocal.stats()["amqp_connections"]
        sblocal.admin("drop-connections")
        sender.send_messages(ServiceBusMessage("after"))
        # The second send needed a new connection: the SDK saw the drop and reconnected.
        assert sblocal.stats()["amqp_connections"] > connections
    assert active(sblocal) == 2


def test_server_busy_is_reported_then_clears(sblocal):
    def scenario() -> None:
        with client(sblocal) as sb, sb.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(ServiceBusMessage("warm-up"))
            sblocal.admin("server-busy", seconds=60)
            with pytest.raises(ServiceBusServerBusyError):
                sender.send_messages(ServiceBusMessage("busy"), timeout=10)
            sblocal.admin("server-busy", seconds=0)
            sender.send_messages(ServiceBusMessage("after"), timeout=10)

    within(60, scenario, "the server-busy scenario")
    assert active(sblocal) == 2


def test_server_busy_window_ends_by_itself(sblocal):
    sblocal.admin("server-busy", seconds=2)
    refusals = []

    def try_send() -> bool:
        try:
            with client(sblocal) as sb, sb.get_queue_sender(sblocal.queue_name) as sender:
                sender.send_messages(ServiceBusMessage("eventually"), timeout=10)
        except ServiceBusServerBusyError:
            refusals.append(True)
            return False
        return True

    within(60, lambda: wait_until(try_send, "sends to be accepted again", attempts=60, pause=0.25), "sending")
    assert refusals, "no send was answered with server-busy during the window"
    assert active(sblocal) == 1


def test_expired_locks_are_lost_and_the_message_redelivered(sblocal):
    with client(sblocal) as sb:
        with sb.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(ServiceBusMessage("locked"))
        with sb.get_queue_receiver(sblocal.queue_name, max_wait_time=10) as receiver:
            first = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            assert len(first) == 1
            sblocal.admin("expire-locks")
            with pytest.raises(MessageLockLostError):
                receiver.complete_message(first[0])
            again = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            assert [str(m) for m in again] == ["locked"]
            assert again[0].delivery_count == 1
            receiver.complete_message(again[0])
    assert active(sblocal) == 0


def test_short_lived_tokens_are_refreshed_by_the_sdk(monkeypatch, sblocal):
    """With 3-second access tokens a TLS receiver outlives several tokens and still receives:
    the SDK re-runs put-token before each expires (the broker drops the links of a lapsed token)."""
    for key, value in sblocal.workload_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sblocal.ca_file)
    sblocal.admin("token-lifetime", seconds=3)
    credential = WorkloadIdentityCredential()
    tls = ServiceBusClient(
        "localhost",
        credential,
        custom_endpoint_address=f"sb://localhost:{sblocal.amqps_port}",
        transport_type=TransportType.Amqp,
        connection_verify=sblocal.ca_file,
        retry_total=1,
    )
    with tls, tls.get_queue_receiver(sblocal.queue_name, max_wait_time=2) as receiver:
        assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
        time.sleep(5)
        with client(sblocal) as sb, sb.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(ServiceBusMessage("after expiry"))
        received = receiver.receive_messages(max_message_count=1, max_wait_time=10)
        assert [str(m) for m in received] == ["after expiry"]
        receiver.complete_message(received[0])
    assert sblocal.stats()["tokens_issued"] >= 2


# --- the process itself ---------------------------------------------------------------------------


def test_sigterm_stops_cleanly_and_closes_the_ports(sblocal):
    import socket

    # An idle client connection must not hold the shutdown up.
    idle = socket.create_connection(("127.0.0.1", sblocal.amqp_port), timeout=2)
    idle.sendall(b"AMQP\x03\x01\x00\x00")
    assert sblocal.stop() == 0
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", sblocal.amqp_port), timeout=2).close()
