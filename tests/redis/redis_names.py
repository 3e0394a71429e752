"""The names a test leaves in Redis, and their removal."""

from __future__ import annotations


def namespace_patterns(namespace: str) -> list[bytes]:
    """SCAN patterns of the names RedisCache uses in namespace, and of the tests' own names."""
    from wq_memo.backends._redis_keys import Namespace, glob_escape

    raw = namespace.encode()
    return [glob_escape(Namespace(namespace).prefix) + b":*", glob_escape(raw) + b":*"]


def delete_namespace(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        for pattern in namespace_patterns(namespace):
            names = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(names), 1000):
                client.delete(*names[i : i + 1000])
    finally:
        client.close()
