"""A tiny ASGI web service with a memoized endpoint, and its metrics through OpenTelemetry.

``GET /price/{sku}`` answers with a price that takes 50 ms to look up; the lookup is memoized
with ``@worker_queue``, so concurrent and repeated requests for one SKU look it up once. No
web framework is needed: ``app`` is a plain ASGI application, and ``call(app, path)`` drives it
in-process, as a server would. Run it (``pip install 'wq_memo[otel]' opentelemetry-sdk``):

    python examples/web_service.py

It sends 200 concurrent requests over 5 SKUs, then one more for each and one for a SKU that does
not exist; it prints each SKU's price and the metrics the OpenTelemetry SDK's in-memory reader
collected, and exits with status 1 if any SKU was looked up more than once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cachetools import TTLCache

from wq_memo import worker_queue

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

lookups: dict[str, int] = {}
"""How many times each SKU's price was looked up (the slow thing)."""


@worker_queue(maxsize=4, cache=TTLCache(maxsize=1_000, ttl=60), name="price")
async def price(sku: str) -> dict[str, object]:
    """The price of a SKU, from a slow backend."""
    lookups[sku] = lookups.get(sku, 0) + 1
    await asyncio.sleep(0.05)
    if not sku.isalnum():
        raise ValueError(f"no such SKU: {sku!r}")
    return {"sku": sku, "cents": 100 + sum(map(ord, sku)) % 900}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application: GET /price/{sku}."""
    assert scope["type"] == "http"
    path: str = scope["path"]
    body: dict[str, object]
    if scope["method"] != "GET" or not path.startswith("/price/"):
        status, body = 404, {"error": "not found"}
    else:
        try:
            status, body = 200, await price(path.removeprefix("/price/"))
        except ValueError as exc:
            status, body = 404, {"error": str(exc)}
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def call(
    application: Callable[[Scope, Receive, Send], Awaitable[None]], path: str
) -> tuple[int, Any]:
    """Send GET path to an ASGI application in-process; return the status and the JSON body."""
    scope: Scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await application(scope, receive, send)
    start, *bodies = sent
    return start["status"], json.loads(b"".join(m["body"] for m in bodies))


async def main() -> int:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from wq_memo.metrics import enable_opentelemetry, remove_listener

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    try:
        skus = ["apple", "pear", "plum", "fig", "kiwi"]
        answers = await asyncio.gather(*(call(app, f"/price/{skus[i % 5]}") for i in range(200)))
        assert all(status == 200 for status, _ in answers)
        await asyncio.gather(*(call(app, f"/price/{sku}") for sku in skus))  # hits, now
        assert (await call(app, "/price/no-such-sku"))[0] == 404  # a failure, by its type
        for sku, cents in sorted({b["sku"]: b["cents"] for _, b in answers}.items()):
            print(f"{sku}: {cents} cents")
        data = reader.get_metrics_data()
    finally:
        remove_listener(adapter)
        provider.shutdown()
        await price.queue.aclose()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:  # a histogram
                        value = f"count={point.count} sum={point.sum:.3f}"  # type: ignore[union-attr]
                    print(f"{metric.name} {dict(point.attributes or {})} {value}")
    return 0 if all(n == 1 for n in lookups.values()) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
