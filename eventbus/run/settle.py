"""Settling finished jobs on the connection's thread: ack, retry through a delay queue, dead-letter.

Retries are republished (with a publisher confirm) to ``<queue>.retry.<ms>``, whose TTL
dead-letters them back to the queue, then the original is acked. After ``max_attempts`` the
message goes to ``<queue>.dead`` with ``x-exception``, ``x-exception-message``, ``x-attempts``,
``x-original-routing-key`` and ``x-first-failure-at``; a malformed one at once, with
``x-dead-reason``. On virtual transports a retry is a timer in this process.
"""

from __future__ import annotations

import datetime as dt
import queue as queues
import threading
from typing import Any

from eventbus.bus.delivery import EXPIRES_AT
from eventbus.bus.runtime import Acks, Delivery, connect, text, truncate
from eventbus.bus.wire import PROPERTIES, Message, Publisher, is_amqp
from eventbus.errors import PublishError
from eventbus.events.personal import scrub_text
from eventbus.run.jobs import Job, Outcome, WorkerBase, attempt_of, error_fields, log_fields


class Settling(WorkerBase):
    """The worker's settling of finished jobs (runs on the connection's thread only)."""

    def _settle(self, publisher: Publisher, generation: int, acks: Acks) -> None:
        """Ack, retry or dead-letter what the handler threads finished (on this thread only).

        A partition's job settles on the acks of its own channel; none if that channel is
        closed (the broker gave its messages back) or the job was dropped (its channel's
        closing will).
        """
        partitions: set[Acks] = set()
        while True:
            try:
                item = self._done.get_nowait()  # a job, or a handler thread's batch of them
            except queues.Empty:
                acks.flush()
                for own in partitions:
                    if not own.closed:
                        own.flush()
                return
            jobs = item if isinstance(item, list) else [item]
            for i, job in enumerate(jobs):
                try:
                    self._settle_one(publisher, generation, acks, partitions, job)
                except BaseException:
                    if i + 1 < len(jobs):  # settled after the reconnect (an old generation)
                        self._done.put(jobs[i + 1 :])
                    raise

    def _settle_one(
        self, publisher: Publisher, generation: int, acks: Acks, partitions: set[Acks], job: Job
    ) -> None:
        try:
            if job.generation != generation:
                return  # its channel is gone; the broker redelivers it
            settle = acks if job.acks is None else job.acks
            if settle.closed or job.outcome is Outcome.DROP:
                return  # never covered by a multiple ack: it stays unsettled
            if settle is not acks:
                partitions.add(settle)
            settle.settled(job.message.delivery_tag)
            if job.outcome is Outcome.ACK:
                settle.ack(job.message)
            elif job.outcome is Outcome.REQUEUE:
                job.message.reject(True)
            elif job.outcome is Outcome.RETRY:
                self._retry(publisher, job)
            elif job.outcome is Outcome.EXPIRED:
                self._expired(publisher, job, settle)
            elif job.outcome is Outcome.EXHAUSTED:
                headers = self._failure_headers(job, job.failures, job.first_failure or "")
                self._give_up(publisher, job, headers, job.failures)
                job.settled = True
            else:
                self._dead_letter(publisher, job, job.reason)
        except self._recoverable():
            raise
        except Exception as exc:
            # Its headers could not be sent back (a value AMQP cannot encode, say): dead-letter
            # it with the body, its properties and only eventbus's own headers.
            self._dead_letter(
                publisher,
                job,
                f"{job.reason or job.outcome.value}; its headers could not be republished "
                f"({type(exc).__name__}: {exc})",
                keep_headers=False,
            )
            job.settled = True
        finally:
            with self._lock:
                self._in_flight -= 1

    def _failure_headers(self, job: Job, attempt: int, first_failure: str) -> dict[str, Any]:
        """The message's headers plus why and how often it failed (for a retry or dead letter)."""
        message, exc = job.message, job.exception
        headers = dict(message.headers or {})
        headers.setdefault("x-first-failure-at", first_failure)
        headers.setdefault("x-original-routing-key", message.routing_key)
        headers["x-attempts"] = attempt
        headers["x-exception"] = type(exc).__name__ if exc else "Exception"
        headers["x-exception-message"] = truncate(
            scrub_text(job.event, str(exc) if exc else job.reason)
        )
        return headers

    def _retry(self, publisher: Publisher, job: Job) -> None:
        handler, message = job.handler, job.message
        attempt = attempt_of(message.headers or {}, handler.max_attempts)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        headers = self._failure_headers(job, attempt, now)
        exc = job.exception
        bound = self._log.bind(**log_fields(job, attempt))
        if attempt >= handler.max_attempts:
            self._metrics[handler.queue].failed()
            self._give_up(publisher, job, headers, attempt)
            return
        delay = handler.retry_delays()[attempt - 1]
        if is_amqp(publisher.connection):
            publish_to(publisher, handler.retry_queue(attempt), republished(message, headers))
        else:
            self._retry_in_process(handler.queue, republished(message, headers), delay)
        message.ack()
        self._count("retried")
        self._metrics[handler.queue].failed()
        self._metrics[handler.queue].retried()
        bound.warning("event.retry_scheduled", retry_in=delay, **error_fields(exc))

    def _give_up(
        self, publisher: Publisher, job: Job, headers: dict[str, Any], attempt: int
    ) -> None:
        """Dead-letter an event whose attempts are exhausted (its last failure was counted)."""
        handler, message = job.handler, job.message
        publish_to(publisher, handler.dead_letter_queue, republished(message, headers))
        message.ack()
        self._count("dead")
        self._metrics[handler.queue].dead_lettered("attempts_exhausted")
        self._log.bind(**log_fields(job, attempt)).error(
            "event.dead_lettered", reason="attempts exhausted", **error_fields(job.exception)
        )

    def _retry_in_process(self, queue: str, msg: Message, delay: float) -> None:
        def put_back() -> None:
            try:
                with connect(self.broker_url) as conn:
                    Publisher(conn, "").publish([(queue, msg)])
            except Exception as exc:
                self._log.error("event.retry_lost", queue=queue, error=str(exc))

        timer = threading.Timer(delay, put_back)
        timer.daemon = True
        timer.start()

    def _expired(self, publisher: Publisher, job: Job, acks: Acks) -> None:
        """A message received after its event's deadline: counted, logged, then dropped (acked)
        or dead-lettered with the reason "expired", as its handler chose (``on_expired``)."""
        handler, message = job.handler, job.message
        event_type = job.event.type if job.event is not None else ""
        self._metrics[handler.queue].expired(event_type)
        self._count("expired")
        self._log.bind(**log_fields(job, None)).info(
            "event.expired",
            expires_at=text((message.headers or {}).get(EXPIRES_AT)),
            on_expired=handler.on_expired,
        )
        if handler.on_expired == "dead_letter":
            self._dead_letter(publisher, job, "expired", metric="expired")
        else:
            acks.ack(message)

    def _dead_letter(
        self,
        publisher: Publisher,
        job: Job,
        reason: str,
        *,
        keep_headers: bool = True,
        metric: str = "malformed",
    ) -> None:
        handler, message = job.handler, job.message
        headers = dict(message.headers or {}) if keep_headers else {}
        reason = scrub_text(job.event, reason)  # no personal value quoted by an error
        headers["x-dead-reason"] = truncate(reason)
        headers.setdefault("x-original-routing-key", message.routing_key)
        headers["x-failed-at"] = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        headers["x-queue"] = handler.queue
        publish_to(publisher, handler.dead_letter_queue, republished(message, headers))
        message.ack()
        self._count("dead")
        self._metrics[handler.queue].dead_lettered(metric)
        self._log.error(
            "message.dead_lettered",
            queue=handler.queue,
            handler=handler.name,
            message_id=text(message.properties.get("message_id")),
            message_type=text(message.properties.get("type")),
            reason=reason,
        )


def publish_to(publisher: Publisher, queue: str, message: Message) -> None:
    """Publish to a queue by name; a queue that is gone is an error (reconnect, redeclare)."""
    if publisher.publish([(queue, message)]):
        raise PublishError(f"queue {queue!r} does not exist: the message was returned")


def republished(message: Delivery, headers: dict[str, Any]) -> Message:
    props = message.properties
    properties = {k: props[k] for k in PROPERTIES if props.get(k) is not None}
    properties["delivery_mode"] = 2
    return message.body, properties, headers
