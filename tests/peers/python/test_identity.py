"""Workload identity against sblocal's Entra stand-in, with Microsoft's own clients, unpatched:
azure-identity's WorkloadIdentityCredential exchanges a minted service-account token at the
HTTPS token endpoint (trusting DIR/ca.pem through REQUESTS_CA_BUNDLE), and azure-servicebus uses
the resulting access token over the TLS port, where role assignments decide what it may do."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid

import jwt as pyjwt
import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import WorkloadIdentityCredential
from azure.servicebus import ServiceBusClient, ServiceBusMessage, TransportType
from azure.servicebus.exceptions import (
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import read_env_file

SCOPE = "https://servicebus.azure.net/.default"
AUTH_ERRORS = (ServiceBusAuthorizationError, ServiceBusAuthenticationError)


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def use_env(monkeypatch, sblocal, env: dict) -> None:
    """Exports a workload env the way the webhook would, plus the CA bundle for `requests`."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sblocal.ca_file)


def credential_for(monkeypatch, sblocal, name: str, **kwargs) -> WorkloadIdentityCredential:
    use_env(monkeypatch, sblocal, sblocal.identity_env(name, **kwargs))
    return WorkloadIdentityCredential()


def tls_client(sblocal, credential) -> ServiceBusClient:
    """The production path: amqps to the TLS port with Entra tokens (no connection string)."""
    return ServiceBusClient(
        "localhost",
        credential,
        custom_endpoint_address=f"sb://localhost:{sblocal.amqps_port}",
        transport_type=TransportType.Amqp,
        connection_verify=sblocal.ca_file,
        retry_total=0,
    )


def test_workload_env_as_written_gets_a_service_bus_token(monkeypatch, sblocal):
    use_env(monkeypatch, sblocal, sblocal.workload_env)
    token = WorkloadIdentityCredential().get_token(SCOPE)
    owner = sblocal.identities()["servicebusdemo"]
    claims = claims_of(token.token)
    assert claims["aud"] == "https://servicebus.azure.net"
    assert claims["oid"] == owner["object_id"]
    assert claims["appid"] == owner["client_id"]
    assert claims["tid"] == sblocal.workload_env["AZURE_TENANT_ID"]
    assert "roles" not in claims
    assert token.expires_on > claims["iat"]
    assert sblocal.stats()["tokens_issued"] == 1


def test_workload_env_names_the_tls_port_ca_and_management_endpoint(sblocal):
    env = sblocal.workload_env
    assert env["AZURE_SERVICEBUS_HOSTNAME"] == f"localhost:{sblocal.amqps_port}"
    assert env["AZURE_SERVICEBUS_QUEUE_NAME"] == "queue.1"
    assert env["SSL_CERT_FILE"] == sblocal.ca_file
    assert env["AZURE_AUTHORITY_HOST"] == f"https://localhost:{sblocal.https_port}/"
    assert env["AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT"] == f"https://localhost:{sblocal.https_port}/"
    assert env["AZURE_CLIENT_ID"] == sblocal.identities()["servicebusdemo"]["client_id"]
    token = open(env["AZURE_FEDERATED_TOKEN_FILE"]).read().strip()
    assert claims_of(token)["sub"] == "system:serviceaccount:default:servicebusdemo"
    assert claims_of(token)["aud"] == ["api://AzureADTokenExchange"]


def test_wrong_subject_gets_aadsts70021(monkeypatch, sblocal):
    credential = credential_for(
        monkeypatch, sblocal, "servicebusdemo", sub="system:serviceaccount:default:intruder"
    )
    with pytest.raises(ClientAuthenticationError) as raised:
        credential.get_token(SCOPE)
    assert "AADSTS70021" in str(raised.value)
    assert "system:serviceaccount:default:intruder" in str(raised.value)
    assert sblocal.stats()["tokens_issued"] == 0


def test_another_identitys_subject_gets_aadsts70021(monkeypatch, sblocal):
    producer_subject = "system:serviceaccount:default:servicebusdemo-producer"
    credential = credential_for(monkeypatch, sblocal, "servicebusdemo-consumer", sub=producer_subject)
    with pytest.raises(ClientAuthenticationError, match="AADSTS70021"):
        credential.get_token(SCOPE)


def test_expired_assertion_gets_aadsts700024(monkeypatch, sblocal):
    credential = credential_for(monkeypatch, sblocal, "servicebusdemo", ttl=-60)
    with pytest.raises(ClientAuthenticationError, match="AADSTS700024"):
        credential.get_token(SCOPE)


def test_assertion_from_another_issuer_key_is_refused(monkeypatch, sblocal):
    """A token with the right claims signed by a key the issuer never published."""
    intruder_key = ec.generate_private_key(ec.SECP256R1())
    issuer = (sblocal.dir / "oidc-issuer").read_text().strip()
    owner = sblocal.identities()["servicebusdemo"]
    forged = pyjwt.encode(
        {
            "iss": issuer,
            "sub": owner["federated_credentials"][0]["subject"],
            "aud": ["api://AzureADTokenExchange"],
            "iat": 0,
            "exp": 4102444800,
        },
        intruder_key,
        algorithm="ES256",
    )
    token_file = sblocal.dir / "forged-token"
    token_file.write_text(forged)
    use_env(monkeypatch, sblocal, {**sblocal.workload_env, "AZURE_FEDERATED_TOKEN_FILE": str(token_file)})
    with pytest.raises(ClientAuthenticationError, match="AADSTS700027"):
        WorkloadIdentityCredential().get_token(SCOPE)


def test_issuer_discovery_and_jwks_verify_minted_tokens_independently(sblocal):
    """PyJWT, an independent implementation, verifies `sblocal token` output with the published JWKS."""
    issuer = (sblocal.dir / "oidc-issuer").read_text().strip()
    discovery = requests.get(f"{issuer}/.well-known/openid-configuration", verify=sblocal.ca_file, timeout=10)
    assert discovery.status_code == 200
    assert discovery.json()["issuer"] == issuer
    jwks = requests.get(discovery.json()["jwks_uri"], verify=sblocal.ca_file, timeout=10).json()
    token = sblocal.token("system:serviceaccount:default:anyone", ttl=120)
    kid = pyjwt.get_unverified_header(token)["kid"]
    jwk = next(key for key in jwks["keys"] if key["kid"] == kid)
    claims = pyjwt.decode(
        token,
        pyjwt.PyJWK(jwk).key,
        algorithms=["ES256"],
        audience="api://AzureADTokenExchange",
        issuer=issuer,
    )
    assert claims["sub"] == "system:serviceaccount:default:anyone"


def test_assertion_signed_by_pyjwt_with_the_issuer_key_is_accepted(monkeypatch, sblocal):
    """The exchange accepts any correct ES256 signer, not just sblocal's own."""
    key = serialization.load_pem_private_key((sblocal.dir / "issuer-key.pem").read_bytes(), password=None)
    issuer = (sblocal.dir / "oidc-issuer").read_text().strip()
    assertion = pyjwt.encode(
        {
            "iss": issuer,
            "sub": "system:serviceaccount:default:servicebusdemo-scaler",
            "aud": "api://AzureADTokenExchange",
            "iat": 0,
            "exp": 4102444800,
        },
        key,
        algorithm="ES256",
        headers={"kid": claims_kid(sblocal)},
    )
    token_file = sblocal.dir / "pyjwt-token"
    token_file.write_text(assertion)
    scaler = sblocal.identities()["servicebusdemo-scaler"]
    use_env(
        monkeypatch,
        sblocal,
        {**sblocal.workload_env, "AZURE_CLIENT_ID": scaler["client_id"], "AZURE_FEDERATED_TOKEN_FILE": str(token_file)},
    )
    token = WorkloadIdentityCredential().get_token(SCOPE)
    assert claims_of(token.token)["oid"] == scaler["object_id"]


def claims_kid(sblocal) -> str:
    return pyjwt.get_unverified_header(sblocal.token("system:serviceaccount:default:x"))["kid"]


def test_token_lifetime_is_configurable(sblocal_factory, monkeypatch):
    instance = sblocal_factory(extra_args=["--token-lifetime", "120"])
    use_env(monkeypatch, instance, instance.workload_env)
    token = WorkloadIdentityCredential().get_token(SCOPE)
    claims = claims_of(token.token)
    assert claims["exp"] - claims["iat"] == 120


def test_identities_file_and_identity_choose_workload_env(sblocal_factory, tmp_path, monkeypatch):
    identities = tmp_path / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "tenant_id": "11111111-2222-3333-4444-555555555555",
                "identities": [
                    {
                        "name": "worker",
                        "client_id": "aaaaaaaa-0000-0000-0000-000000000001",
                        "roles": ["Azure Service Bus Data Receiver"],
                        "federated_credentials": [{"subject": "system:serviceaccount:jobs:worker"}],
                    }
                ],
            }
        )
    )
    instance = sblocal_factory(identities=identities, identity="worker")
    env = instance.workload_env
    assert env["AZURE_CLIENT_ID"] == "aaaaaaaa-0000-0000-0000-000000000001"
    assert env["AZURE_TENANT_ID"] == "11111111-2222-3333-4444-555555555555"
    use_env(monkeypatch, instance, env)
    token = WorkloadIdentityCredential().get_token(SCOPE)
    assert claims_of(token.token)["tid"] == "11111111-2222-3333-4444-555555555555"


def test_unknown_identity_is_a_clear_startup_error(tmp_path):
    from conftest import sblocal_binary

    result = subprocess.run(
        [str(sblocal_binary()), "serve", "--dir", str(tmp_path), "--identity", "nobody",
         "--amqp", "127.0.0.1:0", "--amqps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--https", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "nobody" in result.stderr and "servicebusdemo-producer" in result.stderr
    assert "ready" not in result.stdout


def test_token_command_without_a_serve_dir_explains(tmp_path):
    from conftest import sblocal_binary

    result = subprocess.run(
        [str(sblocal_binary()), "token", "--dir", str(tmp_path), "--sub", "system:serviceaccount:a:b"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "sblocal serve" in result.stderr


# --- Service Bus with Entra tokens over TLS (needs the AMQP broker) -----------------------------


def test_owner_sends_and_receives_over_tls(monkeypatch, sblocal):
    credential = credential_for(monkeypatch, sblocal, "servicebusdemo")
    body = f"hello {uuid.uuid4()}"
    with tls_client(sblocal, credential) as client:
        with client.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(ServiceBusMessage(body))
        with client.get_queue_receiver(sblocal.queue_name, max_wait_time=10) as receiver:
            received = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            assert [str(m) for m in received] == [body]
            receiver.complete_message(received[0])


def test_producer_sends_and_consumer_receives_with_least_privilege(monkeypatch, sblocal):
    body = f"least privilege {uuid.uuid4()}"
    producer = credential_for(monkeypatch, sblocal, "servicebusdemo-producer")
    with tls_client(sblocal, producer) as client, client.get_queue_sender(sblocal.queue_name) as sender:
        sender.send_messages(ServiceBusMessage(body))
    consumer = credential_for(monkeypatch, sblocal, "servicebusdemo-consumer")
    with tls_client(sblocal, consumer) as client:
        with client.get_queue_receiver(sblocal.queue_name, max_wait_time=10) as receiver:
            received = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            assert [str(m) for m in received] == [body]
            receiver.complete_message(received[0])


def test_receiver_only_identity_cannot_send(monkeypatch, sblocal):
    consumer = credential_for(monkeypatch, sblocal, "servicebusdemo-consumer")
    with tls_client(sblocal, consumer) as client:
        with pytest.raises(AUTH_ERRORS):
            with client.get_queue_sender(sblocal.queue_name) as sender:
                sender.send_messages(ServiceBusMessage("not allowed"))
    assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 0


def test_sender_only_identity_cannot_receive(monkeypatch, sblocal):
    # A message is waiting, so an authorised receiver would get it.
    with ServiceBusClient.from_connection_string(sblocal.connection_string) as client:
        with client.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(ServiceBusMessage("waiting"))
    producer = credential_for(monkeypatch, sblocal, "servicebusdemo-producer")
    with tls_client(sblocal, producer) as client:
        with pytest.raises(AUTH_ERRORS):
            with client.get_queue_receiver(sblocal.queue_name, max_wait_time=5) as receiver:
                receiver.receive_messages(max_message_count=1, max_wait_time=5)
    assert sblocal.stats()["queues"][sblocal.queue_name]["active_messages"] == 1


def test_env_files_parse_with_conftest_reader(sblocal):
    assert read_env_file(sblocal.dir / "emulator.env") == sblocal.emulator_env
    assert sblocal.connection_string.endswith(";UseDevelopmentEmulator=true")
    assert f"sb://localhost:{sblocal.amqp_port};" in sblocal.connection_string


def test_role_scoped_to_one_queue_does_not_reach_another(sblocal_factory, tmp_path, monkeypatch):
    config = tmp_path / "Config.json"
    config.write_text(
        '{"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": [{"Name": "orders"}, {"Name": "audit"}]}]}}'
    )
    identities = tmp_path / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "orders-writer",
                        "roles": [{"role": "Azure Service Bus Data Sender", "scope": "orders"}],
                        "federated_credentials": [{"subject": "system:serviceaccount:default:orders-writer"}],
                    }
                ]
            }
        )
    )
    instance = sblocal_factory(config=config, identities=identities, identity="orders-writer")
    use_env(monkeypatch, instance, instance.workload_env)
    with tls_client(instance, WorkloadIdentityCredential()) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages(ServiceBusMessage("in scope"))
        with pytest.raises(AUTH_ERRORS):
            with client.get_queue_sender("audit") as sender:
                sender.send_messages(ServiceBusMessage("out of scope"))
    queues = instance.stats()["queues"]
    assert (queues["orders"]["active_messages"], queues["audit"]["active_messages"]) == (1, 0)
