"""azure-servicebus against sblocal's `$cbs` and TLS listener: the production `amqps://HOST:PORT`
path with the broker's CA, and tokens that must be refused (wrong key, expired, wrong entity)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse

import pytest
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.servicebus import ServiceBusClient, ServiceBusMessage, TransportType
from azure.servicebus.exceptions import ServiceBusAuthenticationError, ServiceBusError


def sas_parts(sblocal) -> dict:
    return dict(part.split("=", 1) for part in sblocal.connection_string.split(";") if part)


def sas_token(uri: str, key_name: str, key: str, expiry: int) -> str:
    """The documented SAS algorithm, written independently of sblocal and the SDK."""
    encoded = urllib.parse.quote_plus(uri)
    signature = base64.b64encode(hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest())
    return (
        f"SharedAccessSignature sr={encoded}&sig={urllib.parse.quote_plus(signature)}"
        f"&se={expiry}&skn={urllib.parse.quote_plus(key_name)}"
    )


def tls_client(sblocal, credential, **kwargs) -> ServiceBusClient:
    """amqps to the TLS port, as a client configured with a host name (no connection string)."""
    return ServiceBusClient(
        "localhost",
        credential,
        custom_endpoint_address=f"sb://localhost:{sblocal.amqps_port}",
        transport_type=TransportType.Amqp,
        **kwargs,
    )


def round_trip(sb: ServiceBusClient, queue: str, body: str) -> None:
    with sb.get_queue_sender(queue) as sender:
        sender.send_messages(ServiceBusMessage(body))
    with sb.get_queue_receiver(queue, max_wait_time=5) as receiver:
        [message] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
        assert str(message) == body
        receiver.complete_message(message)


def test_amqp_tls_port_with_the_ca(sblocal):
    parts = sas_parts(sblocal)
    credential = AzureNamedKeyCredential(parts["SharedAccessKeyName"], parts["SharedAccessKey"])
    with tls_client(sblocal, credential, connection_verify=sblocal.ca_file) as sb:
        round_trip(sb, sblocal.queue_name, "over tls")


def test_amqp_tls_refused_without_the_ca(sblocal):
    parts = sas_parts(sblocal)
    credential = AzureNamedKeyCredential(parts["SharedAccessKeyName"], parts["SharedAccessKey"])
    with tls_client(sblocal, credential, retry_total=0) as sb:
        with pytest.raises(ServiceBusError):
            with sb.get_queue_sender(sblocal.queue_name) as sender:
                sender.send_messages(ServiceBusMessage("untrusted"))


def test_amqp_wrong_sas_key_is_refused(sblocal):
    parts = sas_parts(sblocal)
    wrong_key = base64.b64encode(b"not the key at all, not at all!!").decode()
    connection_string = sblocal.connection_string.replace(parts["SharedAccessKey"], wrong_key)
    with ServiceBusClient.from_connection_string(connection_string, retry_total=0) as sb:
        with pytest.raises(ServiceBusAuthenticationError):
            with sb.get_queue_sender(sblocal.queue_name) as sender:
                sender.send_messages(ServiceBusMessage("refused"))
    assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 0


def test_amqp_expired_sas_token_is_refused(sblocal):
    parts = sas_parts(sblocal)
    token = sas_token(
        f"sb://localhost/{sblocal.queue_name}",
        parts["SharedAccessKeyName"],
        parts["SharedAccessKey"],
        int(time.time()) - 60,
    )
    with tls_client(sblocal, AzureSasCredential(token), connection_verify=sblocal.ca_file, retry_total=0) as sb:
        # The SDK reads `se` itself and may give up before the broker's 401; either way no send.
        with pytest.raises(ServiceBusError):
            with sb.get_queue_sender(sblocal.queue_name) as sender:
                sender.send_messages(ServiceBusMessage("too late"))
    assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 0


def test_amqp_token_for_another_entity_is_refused(sblocal):
    parts = sas_parts(sblocal)
    token = sas_token(
        "sb://localhost/some-other-queue",
        parts["SharedAccessKeyName"],
        parts["SharedAccessKey"],
        int(time.time()) + 600,
    )
    with tls_client(sblocal, AzureSasCredential(token), connection_verify=sblocal.ca_file, retry_total=0) as sb:
        with pytest.raises(ServiceBusError):
            with sb.get_queue_sender(sblocal.queue_name) as sender:
                sender.send_messages(ServiceBusMessage("wrong entity"))
    assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 0


def test_amqp_valid_sas_token_credential_works(sblocal):
    parts = sas_parts(sblocal)
    token = sas_token(
        f"sb://localhost/{sblocal.queue_name}",
        parts["SharedAccessKeyName"],
        parts["SharedAccessKey"],
        int(time.time()) + 600,
    )
    with tls_client(sblocal, AzureSasCredential(token), connection_verify=sblocal.ca_file) as sb:
        round_trip(sb, sblocal.queue_name, "with a sas token")
