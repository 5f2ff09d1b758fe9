"""The load generator: a closed loop at fixed concurrency, or Poisson arrivals, over any target.

`run(request, record)` is the target's coroutine: it sends one request, streams its responses
into the record (`record.on_tokens`) and sets `record.end_s` (and `record.error`) when it ends.
"""

import asyncio
import time
from typing import Awaitable, Callable, Optional

from serving_report import RequestRecord
from serving_workload import BenchRequest, adapter_name

RunFn = Callable[[BenchRequest, RequestRecord], Awaitable[None]]


async def drive(requests: list[BenchRequest], concurrency: Optional[int], run: RunFn, start: float,
                progress=None) -> list[RequestRecord]:
    """Sends `requests` from monotonic time `start`; returns one record per request, in order.

    concurrency set: a closed loop (each of `concurrency` workers sends its next request when its
    last one ends); None: each request is sent at `start + arrival_s`, however many are in flight.
    """
    records = [RequestRecord(r.index, None if r.adapter_index is None else adapter_name(r.adapter_index),
                             len(r.prompt_ids), r.output_len, send_s=0.0) for r in requests]
    counts = [0, 0]

    async def one(req: BenchRequest, record: RequestRecord) -> None:
        record.send_s = time.monotonic()
        try:
            await run(req, record)
        except Exception as error:       # a client-side failure is a failed request, not a crash
            record.error = record.error or f"client: {type(error).__name__}: {error}"
        if record.end_s is None:
            record.end_s = time.monotonic()
        counts[0] += 1
        counts[1] += record.tokens
        if progress is not None:
            progress.update(*counts)

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    pairs = list(zip(requests, records))
    if concurrency:
        queue = iter(pairs)

        async def worker():
            for req, record in queue:        # one shared iterator: the next free worker takes the next
                await one(req, record)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        tasks = []
        for req, record in pairs:
            delay = start + req.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(req, record)))
        await asyncio.gather(*tasks)
    return records
