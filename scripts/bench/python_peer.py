#!/usr/bin/env python3
"""The official Python SDK (azure-servicebus) as the benchmark's peer.

Usage:
    python_peer.py send-single COUNT SIZE
    python_peer.py send-batch  COUNT SIZE
    python_peer.py receive     COUNT PREFETCH

Reads AZURE_SERVICEBUS_CONNECTION_STRING and AZURE_SERVICEBUS_QUEUE_NAME from the environment.
Prints one JSON line: {"mode", "messages", "seconds", "per_second"}. The clock starts once the
link is open (the first send or receive), so connection set-up is not counted, and stops when
the broker has accepted the last message (send) or the last completion was sent (receive).
"""

from __future__ import annotations

import json
import os
import sys
import time

from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus import ServiceBusReceiveMode


def body(size: int) -> bytes:
    return b"x" * size


def send_single(client: ServiceBusClient, queue: str, count: int, size: int) -> float:
    payload = body(size)
    with client.get_queue_sender(queue) as sender:
        # Open the link outside the timed part.
        sender.send_messages(ServiceBusMessage(payload))
        started = time.perf_counter()
        for _ in range(count - 1):
            sender.send_messages(ServiceBusMessage(payload))
        return time.perf_counter() - started


def send_batch(client: ServiceBusClient, queue: str, count: int, size: int) -> float:
    payload = body(size)
    with client.get_queue_sender(queue) as sender:
        sender.send_messages(ServiceBusMessage(payload))
        started = time.perf_counter()
        remaining = count - 1
        while remaining > 0:
            batch = sender.create_message_batch()
            while remaining > 0:
                try:
                    batch.add_message(ServiceBusMessage(payload))
                except ValueError:
                    # The batch is full: send it and start the next one.
                    break
                remaining -= 1
            sender.send_messages(batch)
        return time.perf_counter() - started


def receive(client: ServiceBusClient, queue: str, count: int, prefetch: int) -> float:
    with client.get_queue_receiver(
        queue,
        receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
        prefetch_count=prefetch,
        max_wait_time=10,
    ) as receiver:
        done = 0
        started = None
        # Iterating is the SDK's documented way to consume continuously; with prefetch 0 it
        # asks for one message at a time, like a consumer that holds no more than it works on.
        for message in receiver:
            if started is None:
                started = time.perf_counter()
            receiver.complete_message(message)
            done += 1
            if done >= count:
                break
        if started is None or done < count:
            raise SystemExit(f"received only {done} of {count} messages")
        return time.perf_counter() - started


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    mode, count, arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    connection_string = os.environ["AZURE_SERVICEBUS_CONNECTION_STRING"]
    queue = os.environ["AZURE_SERVICEBUS_QUEUE_NAME"]
    with ServiceBusClient.from_connection_string(connection_string) as client:
        if mode == "send-single":
            seconds = send_single(client, queue, count, arg)
            timed = count - 1
        elif mode == "send-batch":
            seconds = send_batch(client, queue, count, arg)
            timed = count - 1
        elif mode == "receive":
            seconds = receive(client, queue, count, arg)
            timed = count - 1
        else:
            raise SystemExit(f"unknown mode {mode!r}\n{__doc__}")
    print(
        json.dumps(
            {
                "mode": mode,
                "messages": count,
                "seconds": round(seconds, 4),
                "per_second": round(timed / seconds, 1) if seconds > 0 else None,
            }
        )
    )


if __name__ == "__main__":
    main()
