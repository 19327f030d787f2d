"""A FastStream RabbitMQ subscriber draining a pre-filled queue: the peer row of ``bus.py``.

    python bench/faststream_consume.py AMQP_URL QUEUE N

Prints the seconds (and this process's CPU seconds) from before connecting until the N-th
message was handled (each acked after
its handler, FastStream's default policy; prefetch 100; the JSON body decoded into a dict, as
FastStream does for a ``dict`` argument). Needs ``pip install 'faststream[rabbit]==0.7.8'``
(installed for this benchmark only).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any


async def drain(url: str, queue: str, n: int) -> tuple[float, float]:
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(url, logger=None)
    done = asyncio.Event()
    seen = [0]
    end = [0.0]

    @broker.subscriber(RabbitQueue(queue, declare=False), channel=Channel(prefetch_count=100))
    async def handle(body: dict[str, Any]) -> None:
        seen[0] += 1
        if seen[0] == n:
            end[0] = time.perf_counter()
            done.set()

    start, cpu = time.perf_counter(), time.process_time()
    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=120 + n / 100)
        await asyncio.sleep(0.2)  # the last ack leaves after the handler returns
    finally:
        await broker.stop()
    return end[0] - start, time.process_time() - cpu


def main() -> None:
    url, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seconds, cpu = asyncio.run(drain(url, queue, n))
    print(f"{seconds:.6f} {cpu:.6f}")


if __name__ == "__main__":
    main()
