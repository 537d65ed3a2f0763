"""Bad input on sblocal's real AMQP port: each offender is answered (or cut off) on its own
connection, and Microsoft's SDK keeps working on others."""

from __future__ import annotations

import socket
import struct

from azure.servicebus import ServiceBusClient, ServiceBusMessage

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"


def raw_connection(sblocal) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", sblocal.amqp_port), timeout=5)
    sock.settimeout(5)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Reads until the broker hangs up (or stays silent for the socket timeout)."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def frame(body: bytes, channel: int = 0) -> bytes:
    return struct.pack(">IBBH", 8 + len(body), 2, 0, channel) + body


def open_frame() -> bytes:
    # open(container-id "raw"): described 0x10, list8 with one string field.
    body = b"\x00\x53\x10\xc0\x06\x01\xa1\x03raw"
    return frame(body)


def sdk_round_trip(sblocal, body: str) -> None:
    with ServiceBusClient.from_connection_string(sblocal.connection_string) as sb:
        with sb.get_queue_sender(sblocal.queue_name) as sender:
            sender.send_messages(ServiceBusMessage(body))
        with sb.get_queue_receiver(sblocal.queue_name) as receiver:
            [message] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            assert str(message) == body
            receiver.complete_message(message)


def test_amqp_non_amqp_bytes_get_the_protocol_header_back(sblocal):
    with raw_connection(sblocal) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_all(sock)
    assert reply.startswith(b"AMQP")
    sdk_round_trip(sblocal, "after http")


def test_amqp_unknown_performative_is_closed_with_decode_error(sblocal):
    with raw_connection(sblocal) as sock:
        sock.sendall(AMQP_HEADER + open_frame() + frame(b"\x00\x53\x7f\x45"))
        reply = read_all(sock)
    assert reply.startswith(AMQP_HEADER)
    assert b"amqp:decode-error" in reply
    sdk_round_trip(sblocal, "after garbage")


def test_amqp_oversized_frame_is_a_framing_error(sblocal):
    with raw_connection(sblocal) as sock:
        sock.sendall(AMQP_HEADER + open_frame() + struct.pack(">IBBH", 0x7FFFFFFF, 2, 0, 0))
        reply = read_all(sock)
    assert b"amqp:connection:framing-error" in reply
    sdk_round_trip(sblocal, "after framing error")


def test_amqp_client_vanishing_mid_frame_leaves_the_broker_serving(sblocal):
    for cut in (3, 8, 14):
        with raw_connection(sblocal) as sock:
            sock.sendall((AMQP_HEADER + open_frame())[:cut])
    sdk_round_trip(sblocal, "after vanishing clients")
