"""Repeated invalid keys slow down per client address, over real sockets from two
loopback addresses: the guessing address gets 429 with Retry-After, the other one is never delayed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.api.auth import LIMITER_STATE, MAX_FAILED_KEYS, FailedKeyLimiter
from tests.fixtures.api import ADMIN_KEY, ApiStack, api_stack

GUESS = "lw_contoso_00000000_" + "x" * 43


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stack(tmp_path: Path, clock: Clock) -> Iterator[ApiStack]:
    with api_stack(tmp_path / "data") as running:
        # The real limits, on a clock the test drives.
        setattr(running.server.app.state, LIMITER_STATE, FailedKeyLimiter(clock=clock))
        yield running


def client_from(stack: ApiStack, address: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.server.url, transport=httpx.HTTPTransport(local_address=address), timeout=30.0
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_an_address_that_keeps_sending_invalid_keys_gets_429_until_its_failures_age_out(
    stack: ApiStack, clock: Clock
) -> None:
    with client_from(stack, "127.0.0.1") as guesser:
        for _ in range(MAX_FAILED_KEYS):
            assert guesser.get("/api/stats", headers=bearer(GUESS)).status_code == 401
        refused = guesser.get("/api/stats", headers=bearer(GUESS))
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "too many invalid API keys" in refused.json()["error"]
        # While refused, not even the right key is checked from there: guesses are not evaluated.
        assert guesser.get("/api/stats", headers=bearer(ADMIN_KEY)).status_code == 429

        clock.now += int(refused.headers["Retry-After"])
        assert guesser.get("/api/stats", headers=bearer(ADMIN_KEY)).status_code == 200


def test_valid_keys_from_other_addresses_are_never_delayed(stack: ApiStack) -> None:
    publisher_key = stack.key_for("contoso")
    with client_from(stack, "127.0.0.1") as guesser, client_from(stack, "127.0.0.2") as other:
        for _ in range(MAX_FAILED_KEYS * 3):
            guesser.get("/api/publishers/contoso/status", headers=bearer(GUESS))
        assert guesser.get("/api/publishers/contoso/status", headers=bearer(GUESS)).status_code == 429
        assert other.get("/api/publishers/contoso/status", headers=bearer(publisher_key)).status_code == 200
        assert other.get("/api/stats", headers=bearer(ADMIN_KEY)).status_code == 200
        # A wrong key there is still a plain 401: that address has its own count.
        assert other.get("/api/stats", headers=bearer(GUESS)).status_code == 401


def test_valid_keys_and_missing_keys_do_not_count_as_failures(stack: ApiStack) -> None:
    with client_from(stack, "127.0.0.1") as client:
        for _ in range(MAX_FAILED_KEYS * 2):
            assert client.get("/api/stats").status_code == 401
            assert client.get("/api/stats", headers=bearer(ADMIN_KEY)).status_code == 200


def test_the_limiter_remembers_a_bounded_number_of_addresses() -> None:
    limiter = FailedKeyLimiter(limit=2, max_addresses=100, clock=lambda: 0.0)
    for n in range(10_000):
        limiter.failed(f"10.0.{n // 256}.{n % 256}")
        limiter.failed(f"10.0.{n // 256}.{n % 256}")
    assert limiter.retry_after("10.0.39.15") is not None  # the most recent one is remembered
    assert limiter.retry_after("10.0.0.0") is None  # the oldest ones were forgotten
    assert limiter.retry_after(None) is None
