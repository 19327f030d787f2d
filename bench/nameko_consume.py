"""A nameko ``@consume`` entrypoint draining a pre-filled queue: a peer row of ``bus.py``.

    python bench/nameko_consume.py AMQP_URL QUEUE N

Prints the seconds (and the process's CPU seconds) from before the service container starts
(and connects) until the N-th message was handled (each acked after its handler, nameko's
policy; ``max_workers`` 100, which nameko also uses as the prefetch count; the JSON body decoded
by kombu, as nameko does). Needs ``pip install 'nameko==2.14.1'`` (eventlet; installed for this
benchmark only, in a virtual environment of its own).
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402


def drain(url: str, queue: str, n: int) -> tuple[float, float]:
    from eventlet.event import Event
    from kombu import Queue
    from nameko.containers import ServiceContainer
    from nameko.messaging import consume

    done = Event()
    seen = [0]

    class Drain:
        name = "bench_drain"

        @consume(Queue(queue, no_declare=True))
        def handle(self, body: Any) -> None:
            seen[0] += 1
            if seen[0] == n:
                done.send(time.perf_counter())

    start, cpu = time.perf_counter(), time.process_time()
    container = ServiceContainer(Drain, config={"AMQP_URI": url, "max_workers": 100})
    container.start()
    try:
        with eventlet.Timeout(120 + n / 100):
            end = done.wait()
        eventlet.sleep(0.2)  # the last ack leaves after the handler returns
    finally:
        container.stop()
    return float(end - start), time.process_time() - cpu


def main() -> None:
    url, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seconds, cpu = drain(url, queue, n)
    print(f"{seconds:.6f} {cpu:.6f}")


if __name__ == "__main__":
    main()
