"""Publishing to the topic exchange with publisher confirms awaited per window.

kombu publishes with one confirm round trip per message when ``confirm_publish`` is on (~1,500
messages/s here). This module goes one level down, to py-amqp's channel: it sends a whole window
of persistent, ``mandatory`` messages, then waits for the broker's acks (which may ack many at
once), so a window costs about one round trip. A nack, a channel error or a timeout fails the
whole window: the caller publishes it again, and subscribers drop the duplicates by event id.

Virtual transports (``memory://``, ``filesystem://``) have no confirms: a publish there is
complete when the call returns, and unroutable messages are detected by looking the routing key
up in the exchange's bindings, as RabbitMQ does for ``mandatory``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import amqp
import kombu

from eventbus import _amqp
from eventbus.errors import BusError
from eventbus.wire import Message

_amqp.install()  # undecodable properties become a malformed message, not a dead connection


class PublishError(BusError):
    """The broker did not confirm a window (nack, timeout, channel closed); publish it again."""


def is_amqp(connection: kombu.Connection) -> bool:
    """True on a real AMQP broker (py-amqp transport), False on kombu's virtual transports."""
    return bool(connection.transport.driver_type == "amqp")


def declare_exchange(connection: kombu.Connection, channel: Any, name: str) -> None:
    """Declare the application's durable topic exchange (idempotent)."""
    kombu.Exchange(name, "topic", durable=True, auto_delete=False)(channel).declare()


class Publisher:
    """Publishes messages to one exchange and returns once the broker has confirmed them."""

    def __init__(
        self, connection: kombu.Connection, exchange: str, *, confirm_timeout: float = 30.0
    ) -> None:
        self.connection = connection
        self.exchange = exchange
        self.confirm_timeout = confirm_timeout
        self._amqp = is_amqp(connection)
        self.channel: Any = connection.channel()
        if exchange:  # "" is the default exchange: a routing key names a queue
            declare_exchange(connection, self.channel, exchange)
        self._unconfirmed: set[int] = set()
        self._nacked = 0
        self._returned: list[str] = []
        self._sent = 0
        self._next_tag = 1
        if self._amqp:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)
        else:
            self._producer = kombu.Producer(
                self.channel,
                exchange=kombu.Exchange(exchange, "topic", durable=True)
                if exchange
                else kombu.Exchange(""),
            )

    def close(self) -> None:
        """Close the channel (the connection stays the caller's)."""
        with contextlib.suppress(Exception):  # a channel on a dead connection
            self.channel.close()

    def publish(self, messages: Sequence[tuple[str, Message]]) -> list[str]:
        """Publish ``(routing_key, message)`` pairs and wait until all are confirmed.

        Returns the message ids the broker could not route to any queue (published with
        ``mandatory``); raises ``PublishError`` when the window was not confirmed.
        """
        self.send(messages)
        return self.wait()

    def send(self, messages: Sequence[tuple[str, Message]]) -> None:
        """Publish a window without waiting for its confirms (``wait`` does); one at a time."""
        self._returned = []
        self._sent = len(messages)
        if not self._amqp:
            self._publish_virtual(messages)
            return
        basic_publish = self.channel._basic_publish  # plain publish; confirms come per window
        for routing_key, (body, properties, headers) in messages:
            msg = amqp.Message(body, application_headers=headers, **properties)
            basic_publish(msg, exchange=self.exchange, routing_key=routing_key, mandatory=True)
            self._unconfirmed.add(self._next_tag)
            self._next_tag += 1

    def wait(self) -> list[str]:
        """Wait for the confirms of the window ``send`` published; returns the unroutable ids."""
        deadline = time.monotonic() + self.confirm_timeout
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"{len(self._unconfirmed)} of {self._sent} messages not confirmed "
                    f"within {self.confirm_timeout}s"
                )
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        if self._nacked:
            nacked, self._nacked = self._nacked, 0
            raise PublishError(f"the broker nacked {nacked} of {self._sent} messages")
        return self._returned

    def _publish_virtual(self, messages: Sequence[tuple[str, Message]]) -> None:
        for routing_key, (body, properties, headers) in messages:
            if self.exchange and not self.channel.typeof(self.exchange).lookup(
                self.channel.get_table(self.exchange), self.exchange, routing_key, None
            ):
                self._returned.append(properties["message_id"])
                continue
            self._producer.publish(
                body, routing_key=routing_key, headers=headers, retry=False, **properties
            )

    def _settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > tag}
        else:
            self._unconfirmed.discard(tag)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        before = len(self._unconfirmed)
        self._settle(tag, multiple)
        self._nacked += max(1, before - len(self._unconfirmed))

    def _on_return(self, _exc: Exception, _exchange: str, _key: str, message: Any) -> None:
        self._returned.append(str(message.properties.get("message_id")))
