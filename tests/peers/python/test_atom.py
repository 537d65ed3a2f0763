"""The management (ATOM) endpoint: Microsoft's ServiceBusAdministrationClient over HTTPS (SAS and
Entra bearer tokens) and plain HTTP with curl, as KEDA-style pollers and the emulator's port 5300
are used. Every request is counted on /$admin/stats."""

from __future__ import annotations

import base64
import pathlib
import hashlib
import hmac
import re
import subprocess
import time
import urllib.parse
import xml.etree.ElementTree as ET

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.identity import WorkloadIdentityCredential
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.management import ServiceBusAdministrationClient

ATOM = "{http://www.w3.org/2005/Atom}"
SB = "{http://schemas.microsoft.com/netservices/2010/10/servicebus/connect}"
COUNTS = "{http://schemas.microsoft.com/netservices/2011/06/servicebus}"


def sas_token(uri: str, key_name: str, key: str, ttl: int = 300) -> str:
    """A SAS token written independently of sblocal and of the SDK (the documented algorithm)."""
    expiry = int(time.time()) + ttl
    encoded = urllib.parse.quote_plus(uri)
    signature = base64.b64encode(hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest())
    return (
        f"SharedAccessSignature sr={encoded}&sig={urllib.parse.quote_plus(signature)}"
        f"&se={expiry}&skn={urllib.parse.quote_plus(key_name)}"
    )


def sas_parts(sblocal) -> dict:
    return dict(part.split("=", 1) for part in sblocal.connection_string.split(";") if part)


def https_admin_client(sblocal) -> ServiceBusAdministrationClient:
    """The admin client from a connection string naming the HTTPS port (it always speaks HTTPS)."""
    connection_string = re.sub(
        r"sb://localhost:\d+", f"sb://localhost:{sblocal.https_port}", sblocal.connection_string
    )
    return ServiceBusAdministrationClient.from_connection_string(
        connection_string, connection_verify=sblocal.ca_file, retry_total=0
    )


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=30)


def test_health_on_both_ports(sblocal):
    assert requests.get(f"{sblocal.http_url}/health", timeout=10).status_code == 200
    assert requests.get(f"{sblocal.https_url}/health", verify=sblocal.ca_file, timeout=10).status_code == 200


def test_admin_client_reads_queue_settings_and_zero_counts_over_https(sblocal):
    with https_admin_client(sblocal) as admin:
        properties = admin.get_queue(sblocal.queue_name)
        runtime = admin.get_queue_runtime_properties(sblocal.queue_name)
    assert properties.lock_duration.total_seconds() == 60
    assert properties.max_delivery_count == 3
    assert properties.default_message_time_to_live.total_seconds() == 3600
    assert properties.requires_session is False
    assert runtime.name == sblocal.queue_name
    assert runtime.active_message_count == 0
    assert runtime.dead_letter_message_count == 0
    assert runtime.scheduled_message_count == 0
    assert runtime.total_message_count == 0
    assert sblocal.stats()["atom_requests"] == 2


def test_missing_queue_is_not_found(sblocal):
    with https_admin_client(sblocal) as admin:
        with pytest.raises(ResourceNotFoundError):
            admin.get_queue_runtime_properties("no-such-queue")


def test_configured_queues_are_served(sblocal_factory, tmp_path):
    config = tmp_path / "Config.json"
    config.write_text(
        """{"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": [
             // comments are accepted, as in the emulator's sample
             {"Name": "orders", "Properties": {"LockDuration": "PT30S", "MaxDeliveryCount": 5,
                                               "DefaultMessageTimeToLive": "P1D"}},
             {"Name": "audit"}]}]}}"""
    )
    instance = sblocal_factory(config=config)
    assert instance.queue_name == "orders"
    with https_admin_client(instance) as admin:
        orders = admin.get_queue("orders")
        audit = admin.get_queue("audit")
    assert orders.lock_duration.total_seconds() == 30
    assert orders.max_delivery_count == 5
    assert orders.default_message_time_to_live.days == 1
    assert audit.lock_duration.total_seconds() == 60


def test_the_emulators_own_config_is_served(sblocal_factory):
    shared = pathlib.Path(__file__).resolve().parents[4] / "shared" / "emulator" / "Config.json"
    if not shared.is_file():
        pytest.skip(f"{shared} is not present on this machine")
    instance = sblocal_factory(config=shared)
    assert instance.queue_name == "queue.1"
    with https_admin_client(instance) as admin:
        assert admin.get_queue("queue.1").max_delivery_count == 3
    log = instance.stderr()
    assert "topic.1" in log and "not served" in log


def test_session_queue_config_is_refused_clearly(sblocal_factory, tmp_path):
    config = tmp_path / "Config.json"
    config.write_text(
        '{"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": '
        '[{"Name": "q", "Properties": {"RequiresSession": true}}]}]}}'
    )
    with pytest.raises(pytest.fail.Exception) as failed:
        sblocal_factory(config=config)
    assert "RequiresSession" in str(failed.value)


def test_bearer_token_of_an_owner_reads_counts(monkeypatch, sblocal):
    for key, value in sblocal.identity_env("servicebusdemo-scaler").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sblocal.ca_file)
    admin = ServiceBusAdministrationClient(
        f"localhost:{sblocal.https_port}", WorkloadIdentityCredential(), retry_total=0
    )
    with admin:
        runtime = admin.get_queue_runtime_properties(sblocal.queue_name)
    assert runtime.active_message_count == 0


def test_bearer_token_without_manage_is_refused(monkeypatch, sblocal):
    for key, value in sblocal.identity_env("servicebusdemo-producer").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sblocal.ca_file)
    admin = ServiceBusAdministrationClient(
        f"localhost:{sblocal.https_port}", WorkloadIdentityCredential(), retry_total=0
    )
    with admin, pytest.raises((ClientAuthenticationError, HttpResponseError)) as raised:
        admin.get_queue_runtime_properties(sblocal.queue_name)
    assert raised.value.status_code == 401


def test_wrong_sas_key_is_refused(sblocal):
    connection_string = re.sub(
        r"SharedAccessKey=[^;]+", "SharedAccessKey=d3Jvbmc=",
        re.sub(r"sb://localhost:\d+", f"sb://localhost:{sblocal.https_port}", sblocal.connection_string),
    )
    admin = ServiceBusAdministrationClient.from_connection_string(
        connection_string, connection_verify=sblocal.ca_file, retry_total=0
    )
    with admin, pytest.raises((ClientAuthenticationError, HttpResponseError)) as raised:
        admin.get_queue_runtime_properties(sblocal.queue_name)
    assert raised.value.status_code == 401


def test_plain_http_with_curl_and_sas(sblocal):
    parts = sas_parts(sblocal)
    token = sas_token(sblocal.http_url, parts["SharedAccessKeyName"], parts["SharedAccessKey"])
    url = f"{sblocal.http_url}/{sblocal.queue_name}?api-version=2021-05"
    result = curl("-w", "\n%{http_code}", "-H", f"Authorization: {token}", url)
    body, _, status = result.stdout.rpartition("\n")
    assert status == "200", result.stderr
    entry = ET.fromstring(body)
    assert entry.tag == f"{ATOM}entry"
    assert entry.find(f"{ATOM}title").text == sblocal.queue_name
    description = entry.find(f"{ATOM}content/{SB}QueueDescription")
    details = description.find(f"{SB}CountDetails")
    assert details.find(f"{COUNTS}ActiveMessageCount").text == "0"
    assert details.find(f"{COUNTS}DeadLetterMessageCount").text == "0"
    assert description.find(f"{SB}LockDuration").text == "PT1M"


def test_plain_http_without_or_with_bad_auth_is_401(sblocal):
    url = f"{sblocal.http_url}/{sblocal.queue_name}?api-version=2021-05"
    missing = curl("-w", "\n%{http_code}", url)
    body, _, status = missing.stdout.rpartition("\n")
    assert status == "401"
    assert ET.fromstring(body).find("Code").text == "401"
    parts = sas_parts(sblocal)
    expired = sas_token(sblocal.http_url, parts["SharedAccessKeyName"], parts["SharedAccessKey"], ttl=-10)
    status = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: {expired}", url).stdout
    assert status == "401"
    other_queue = sas_token(f"{sblocal.http_url}/other", parts["SharedAccessKeyName"], parts["SharedAccessKey"])
    status = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: {other_queue}", url).stdout
    assert status == "401"


def test_every_atom_request_is_counted(sblocal):
    parts = sas_parts(sblocal)
    token = sas_token(sblocal.http_url, parts["SharedAccessKeyName"], parts["SharedAccessKey"])
    before = sblocal.stats()["atom_requests"]
    for _ in range(3):
        requests.get(
            f"{sblocal.http_url}/{sblocal.queue_name}",
            params={"api-version": "2021-05"},
            headers={"Authorization": token},
            timeout=10,
        )
    requests.get(f"{sblocal.http_url}/{sblocal.queue_name}", timeout=10)  # unauthorised: counted too
    assert sblocal.stats()["atom_requests"] == before + 4


# --- counts that move (needs the AMQP broker) ----------------------------------------------------


def test_runtime_counts_follow_the_queue(sblocal):
    with ServiceBusClient.from_connection_string(sblocal.connection_string, retry_total=1) as client:
        with client.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages([ServiceBusMessage(f"m{i}") for i in range(5)])
        with client.get_queue_receiver(sblocal.queue_name, max_wait_time=10) as receiver:
            first = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            assert len(first) == 1
            receiver.dead_letter_message(first[0], reason="test", error_description="counted")
            locked = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            assert len(locked) == 1
            with https_admin_client(sblocal) as admin:
                runtime = admin.get_queue_runtime_properties(sblocal.queue_name)
            # Service Bus counts a locked message as active.
            assert runtime.active_message_count == 4
            assert runtime.dead_letter_message_count == 1
            assert runtime.total_message_count == 5
            receiver.complete_message(locked[0])
    with https_admin_client(sblocal) as admin:
        runtime = admin.get_queue_runtime_properties(sblocal.queue_name)
    assert runtime.active_message_count == 3
    assert runtime.dead_letter_message_count == 1
    assert runtime.size_in_bytes > 0


def test_fixed_sas_key_is_used_and_bad_ones_refused(sblocal_factory, tmp_path):
    instance = sblocal_factory(extra_args=["--sas-key", "c3RhYmxlLWtleQ=="])
    assert "SharedAccessKey=c3RhYmxlLWtleQ==;" in instance.connection_string
    with https_admin_client(instance) as admin:
        assert admin.get_queue_runtime_properties(instance.queue_name).active_message_count == 0
    from conftest import sblocal_binary

    result = subprocess.run(
        [str(sblocal_binary()), "serve", "--dir", str(tmp_path / "bad"), "--sas-key", "a;b"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--sas-key" in result.stderr
