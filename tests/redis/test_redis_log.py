"""Passwords hidden in every form a Redis URL can carry them."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from wq_memo.backends._redis_log import Secrets, redact_url

PASSWORD = "s3cr:et@/?&="
QUOTED = quote(PASSWORD, safe="")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pw@host/0", "redis://:***@host/0"),
        ("redis://pw@host/0", "redis://***@host/0"),
        ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=1"),
        ("redis://host/0?db=1&Password=pw", "redis://host/0?db=1&Password=***"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
        ("rediss://u:p@w@host", "rediss://u:***@host"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{QUOTED}@host/0",
        f"redis://host/0?password={QUOTED}",
        f"unix:///sock?password={QUOTED}&db=0",
        f"redis://user:{QUOTED}@[::1",
    ],
)
def test_secrets_hide_the_password_as_written_and_decoded(url: str) -> None:
    secrets = Secrets.of_url(url)
    text = f"failed at {url}: password {PASSWORD!r}, or {QUOTED}"
    hidden = secrets.hide(text)
    assert PASSWORD not in hidden
    assert QUOTED not in hidden
    assert "s3cr" not in redact_url(url)
