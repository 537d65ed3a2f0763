"""Microsoft's azure-servicebus SDK against sblocal's AMQP side: sending, peek-lock receiving and
every settlement, over the emulator-style plain AMQP port with the SAS connection string."""

from __future__ import annotations

import datetime
import json
import time

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    MessageLockLostError,
    MessagingEntityNotFoundError,
    ServiceBusError,
)

WAIT = 5  # seconds a receive may wait for messages that are known to be there


def client(sblocal) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(sblocal.connection_string)


def queue_counts(sblocal, queue=None) -> dict:
    return sblocal.stats()["queues"][queue or sblocal.queue_name]


def send(sblocal, bodies, queue=None, **properties) -> None:
    with client(sblocal) as sb, sb.get_queue_sender(queue or sblocal.queue_name) as sender:
        sender.send_messages([ServiceBusMessage(body, **properties) for body in bodies])


def receive(receiver, count: int, wait: float = WAIT):
    """Receives exactly `count` messages (several calls if the broker hands them out in parts)."""
    got = []
    deadline = time.monotonic() + wait
    while len(got) < count and time.monotonic() < deadline:
        got += receiver.receive_messages(max_message_count=count - len(got), max_wait_time=1)
    return got


def short_lock_config(tmp_path, lock="PT2S", max_delivery=10) -> str:
    config = {
        "UserConfig": {
            "Namespaces": [
                {
                    "Name": "sbemulatorns",
                    "Queues": [
                        {
                            "Name": "short",
                            "Properties": {"LockDuration": lock, "MaxDeliveryCount": max_delivery},
                        }
                    ],
                }
            ]
        }
    }
    path = tmp_path / "Config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_amqp_send_one_and_complete(sblocal):
    send(sblocal, ["hello"], application_properties={"kind": "greeting"}, message_id="m-1")
    assert queue_counts(sblocal)["active_messages"] == 1
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        [message] = receive(receiver, 1)
        assert str(message) == "hello"
        assert message.message_id == "m-1"
        assert message.application_properties[b"kind"] == b"greeting"
        assert message.sequence_number == 1
        assert message.delivery_count == 0
        assert message.lock_token is not None
        assert message.locked_until_utc > datetime.datetime.now(datetime.timezone.utc)
        assert message.enqueued_time_utc is not None
        # A locked message is still active, as Service Bus counts it.
        assert queue_counts(sblocal)["active_messages"] == 1
        receiver.complete_message(message)
    assert queue_counts(sblocal)["active_messages"] == 0


def test_amqp_send_batch_keeps_order_and_bodies(sblocal):
    with client(sblocal) as sb, sb.get_queue_sender(sblocal.queue_name) as sender:
        batch = sender.create_message_batch()
        for i in range(50):
            batch.add_message(ServiceBusMessage(f"m{i}"))
        sender.send_messages(batch)
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        messages = receive(receiver, 50)
        assert [str(m) for m in messages] == [f"m{i}" for i in range(50)]
        assert [m.sequence_number for m in messages] == list(range(1, 51))
        assert len({str(m.lock_token) for m in messages}) == 50
        for message in messages:
            receiver.complete_message(message)
    assert queue_counts(sblocal)["active_messages"] == 0


def test_amqp_large_message_spans_frames(sblocal):
    body = "x" * 200_000  # larger than any max-frame-size either side announces
    send(sblocal, [body])
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        [message] = receive(receiver, 1)
        assert str(message) == body
        receiver.complete_message(message)


def test_amqp_oversized_message_is_refused(sblocal):
    with client(sblocal) as sb, sb.get_queue_sender(sblocal.queue_name) as sender:
        with pytest.raises(ServiceBusError):
            sender.send_messages(ServiceBusMessage("y" * 400_000))
    assert queue_counts(sblocal)["active_messages"] == 0


def test_amqp_abandon_increments_delivery_count(sblocal):
    send(sblocal, ["again"])
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        [first] = receive(receiver, 1)
        assert first.delivery_count == 0
        receiver.abandon_message(first)
        [second] = receive(receiver, 1)
        assert str(second) == "again"
        assert second.delivery_count == 1
        assert second.sequence_number == first.sequence_number
        assert second.lock_token != first.lock_token
        receiver.complete_message(second)


def test_amqp_dead_letter_with_reason_readable_from_dlq(sblocal):
    send(sblocal, ["poison"])
    with client(sblocal) as sb:
        with sb.get_queue_receiver(sblocal.queue_name) as receiver:
            [message] = receive(receiver, 1)
            receiver.dead_letter_message(message, reason="BadInput", error_description="cannot parse")
        counts = queue_counts(sblocal)
        assert counts["active_messages"] == 0
        assert counts["dead_letter_messages"] == 1
        with sb.get_queue_receiver(sblocal.queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            [peeked] = dlq.peek_messages(max_message_count=5)
            assert peeked.dead_letter_reason == "BadInput"
            [dead] = receive(dlq, 1)
            assert str(dead) == "poison"
            assert dead.dead_letter_reason == "BadInput"
            assert dead.dead_letter_error_description == "cannot parse"
            dlq.complete_message(dead)
    assert queue_counts(sblocal)["dead_letter_messages"] == 0


def test_amqp_defer_then_receive_deferred(sblocal):
    send(sblocal, ["later", "now"])
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        first, second = receive(receiver, 2)
        receiver.defer_message(first)
        receiver.complete_message(second)
        # Deferred messages are not handed out again by a normal receive.
        assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
        [deferred] = receiver.receive_deferred_messages([first.sequence_number])
        assert str(deferred) == "later"
        receiver.complete_message(deferred)
    assert queue_counts(sblocal)["active_messages"] == 0


def test_amqp_renew_lock_moves_locked_until(sblocal):
    send(sblocal, ["slow"])
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        [message] = receive(receiver, 1)
        before = message.locked_until_utc
        time.sleep(1.1)
        after = receiver.renew_message_lock(message)
        assert after > before
        assert message.locked_until_utc == after
        receiver.complete_message(message)


def test_amqp_peek_does_not_lock_and_is_in_sequence_order(sblocal):
    send(sblocal, [f"p{i}" for i in range(5)])
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        peeked = receiver.peek_messages(max_message_count=10)
        assert [str(m) for m in peeked] == [f"p{i}" for i in range(5)]
        assert [m.sequence_number for m in peeked] == list(range(1, 6))
        later = receiver.peek_messages(max_message_count=2, sequence_number=4)
        assert [m.sequence_number for m in later] == [4, 5]
        # Peeking locked nothing: all five can be received at once.
        received = receive(receiver, 5)
        assert len(received) == 5
        for message in received:
            receiver.complete_message(message)
        assert receiver.peek_messages(max_message_count=10, sequence_number=1) == []


def test_amqp_receive_and_delete(sblocal):
    send(sblocal, ["gone1", "gone2"])
    with client(sblocal) as sb, sb.get_queue_receiver(
        sblocal.queue_name, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
    ) as receiver:
        messages = receive(receiver, 2)
        assert [str(m) for m in messages] == ["gone1", "gone2"]
    assert queue_counts(sblocal)["active_messages"] == 0


def test_amqp_empty_receive_returns_after_wait(sblocal):
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        assert receiver.receive_messages(max_message_count=5, max_wait_time=1) == []
    # The credit the client drained left nothing locked.
    send(sblocal, ["after"])
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        [message] = receive(receiver, 1)
        assert message.delivery_count == 0
        receiver.complete_message(message)


def test_amqp_prefetched_messages_are_released_on_close(sblocal):
    send(sblocal, [f"f{i}" for i in range(10)])
    with client(sblocal) as sb:
        with sb.get_queue_receiver(sblocal.queue_name, prefetch_count=10) as receiver:
            [first] = receive(receiver, 1)
            receiver.complete_message(first)
        # The buffered nine went back at once, not after their locks expired.
        with sb.get_queue_receiver(sblocal.queue_name) as receiver:
            rest = receive(receiver, 9)
            assert len(rest) == 9
            for message in rest:
                receiver.complete_message(message)


def test_amqp_lock_expiry_redelivers(sblocal_factory, tmp_path):
    broker = sblocal_factory(config=short_lock_config(tmp_path, lock="PT1S"))
    send(broker, ["expires"], queue="short")
    with client(broker) as sb, sb.get_queue_receiver("short") as receiver:
        [first] = receive(receiver, 1)
        time.sleep(1.5)
        [again] = receive(receiver, 1)
        assert again.sequence_number == first.sequence_number
        assert again.delivery_count == 1
        with pytest.raises(MessageLockLostError):
            receiver.complete_message(first)
        receiver.complete_message(again)


def test_amqp_max_delivery_count_dead_letters(sblocal_factory, tmp_path):
    broker = sblocal_factory(config=short_lock_config(tmp_path, max_delivery=2))
    send(broker, ["unlucky"], queue="short")
    with client(broker) as sb:
        with sb.get_queue_receiver("short") as receiver:
            for _ in range(2):
                [message] = receive(receiver, 1)
                receiver.abandon_message(message)
            assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
        with sb.get_queue_receiver("short", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            [dead] = receive(dlq, 1)
            assert str(dead) == "unlucky"
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
            dlq.complete_message(dead)


def test_amqp_unknown_queue_is_not_found(sblocal):
    with client(sblocal) as sb:
        with pytest.raises(MessagingEntityNotFoundError):
            with sb.get_queue_sender("no-such-queue") as sender:
                sender.send_messages(ServiceBusMessage("lost"))
        with pytest.raises(MessagingEntityNotFoundError):
            with sb.get_queue_receiver("no-such-queue") as receiver:
                receiver.receive_messages(max_wait_time=1)


def test_amqp_scheduled_messages_appear_later_and_can_be_cancelled(sblocal):
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=4)
    much_later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    with client(sblocal) as sb:
        with sb.get_queue_sender(sblocal.queue_name) as sender:
            [cancelled] = sender.schedule_messages(ServiceBusMessage("never"), much_later)
            sender.schedule_messages(ServiceBusMessage("scheduled"), soon)
            sender.send_messages(ServiceBusMessage("annotated", scheduled_enqueue_time_utc=soon))
            counts = queue_counts(sblocal)
            assert counts["scheduled_messages"] == 3
            assert counts["active_messages"] == 0
            sender.cancel_scheduled_messages(cancelled)
        assert queue_counts(sblocal)["scheduled_messages"] == 2
        with sb.get_queue_receiver(sblocal.queue_name) as receiver:
            early = receiver.receive_messages(max_message_count=2, max_wait_time=0.5)
            if datetime.datetime.now(datetime.timezone.utc) < soon:
                assert early == []
            messages = early + receive(receiver, 2 - len(early), wait=15)
            assert sorted(str(m) for m in messages) == ["annotated", "scheduled"]
            for message in messages:
                assert message.scheduled_enqueue_time_utc is not None
                receiver.complete_message(message)
    counts = queue_counts(sblocal)
    assert counts["scheduled_messages"] == 0
    assert counts["active_messages"] == 0


def test_amqp_expired_messages_are_removed(sblocal):
    send(sblocal, ["short-lived"], time_to_live=datetime.timedelta(seconds=1))
    send(sblocal, ["long-lived"])
    time.sleep(1.5)
    with client(sblocal) as sb, sb.get_queue_receiver(sblocal.queue_name) as receiver:
        [message] = receive(receiver, 1)
        assert str(message) == "long-lived"
        receiver.complete_message(message)
        assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
    counts = queue_counts(sblocal)
    assert counts["active_messages"] == 0
    assert counts["dead_letter_messages"] == 0


def test_amqp_deferred_message_settled_through_management(sblocal):
    send(sblocal, ["deferred-poison"])
    with client(sblocal) as sb:
        with sb.get_queue_receiver(sblocal.queue_name) as receiver:
            [message] = receive(receiver, 1)
            receiver.defer_message(message)
            [deferred] = receiver.receive_deferred_messages([message.sequence_number])
            # Abandoning a deferred message leaves it deferred, not back in the queue.
            receiver.abandon_message(deferred)
            assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
            [deferred] = receiver.receive_deferred_messages([message.sequence_number])
            receiver.dead_letter_message(deferred, reason="Deferred", error_description="gave up")
        with sb.get_queue_receiver(sblocal.queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            [dead] = receive(dlq, 1)
            assert str(dead) == "deferred-poison"
            assert dead.dead_letter_reason == "Deferred"
            assert dead.sequence_number == message.sequence_number
            dlq.complete_message(dead)
    counts = queue_counts(sblocal)
    assert counts["active_messages"] == 0
    assert counts["dead_letter_messages"] == 0
