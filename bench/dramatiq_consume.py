"""A Dramatiq worker (one thread) draining a pre-filled queue: a peer row of ``bus.py``.

    python bench/dramatiq_consume.py AMQP_URL QUEUE N BODY_FILE

Dramatiq's RabbitMQ broker reads only its own JSON envelope (actor name, args, options), so
this script first fills a queue of its own, ``QUEUE``, with N messages in that format, each
carrying the same ~1 KB JSON body (``BODY_FILE``) as its argument, untimed (publisher
confirms); then prints the seconds (and CPU seconds) from before the worker starts (and
connects) until the N-th actor call (one worker thread, prefetch 100, Dramatiq's default
middleware; acked after the actor). Needs ``pip install 'dramatiq[rabbitmq]==2.2.1'``
(installed for this benchmark only).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any


def drain(url: str, queue: str, n: int, body: dict[str, Any]) -> tuple[float, float]:
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    if url.endswith("//"):  # kombu's spelling of the vhost "/"; pika reads that as ""
        url = url[:-1] + "%2F"
    broker = RabbitmqBroker(url=url, confirm_delivery=True)
    dramatiq.set_broker(broker)
    done = threading.Event()
    seen = [0]
    end = [0.0]

    @dramatiq.actor(queue_name=queue, max_retries=0)
    def handle(payload: dict[str, Any]) -> None:
        seen[0] += 1
        if seen[0] == n:
            end[0] = time.perf_counter()
            done.set()

    for _ in range(n):
        handle.send(body)
    broker.close()  # the worker connects anew, inside the timing
    start, cpu = time.perf_counter(), time.process_time()
    worker = dramatiq.Worker(broker, worker_threads=1)
    worker.queue_prefetch = 100  # Dramatiq 2.2 reads it from the environment, else 2 per thread
    worker.start()
    try:
        if not done.wait(120 + n / 100):
            raise SystemExit(f"the Dramatiq worker handled {seen[0]} of {n} messages")
        time.sleep(0.2)  # the last ack leaves after the actor returns
    finally:
        worker.stop()
        broker.close()
    return end[0] - start, time.process_time() - cpu


def main() -> None:
    url, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(sys.argv[4], encoding="utf-8") as f:
        body = json.load(f)
    seconds, cpu = drain(url, queue, n, body)
    print(f"{seconds:.6f} {cpu:.6f}")


if __name__ == "__main__":
    main()
