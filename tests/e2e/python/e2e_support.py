"""Fixtures for the end-to-end tests with the official Python `realtime` client.

The server, its database and the JWT secret come from WALCAST_HTTP, DATABASE_URL and
JWT_SECRET (tests/e2e/run exports them). Waiting is always "until it happened or a deadline
passed"; absence is proven with a fence change on a second binding of the same channel.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import jwt
import psycopg
import pytest
from realtime import AsyncRealtimeClient

WAIT_S = 10.0
COMMIT_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: run through tests/e2e/run, or export WALCAST_HTTP, "
            "DATABASE_URL and JWT_SECRET for a running server (see tests/e2e/README.md)",
            pytrace=False,
        )
    return value


@pytest.fixture
def http_url() -> str:
    return _env("WALCAST_HTTP").rstrip("/")


@pytest.fixture
def realtime_url(http_url: str) -> str:
    """What apps pass to AsyncRealtimeClient: the project URL + /realtime/v1, as ws://."""
    return re.sub(r"^http", "ws", http_url) + "/realtime/v1"


@pytest.fixture
def sfx() -> str:
    return secrets.token_hex(5)


def mint_token(
    role: str = "anon",
    expires_in: int = 3600,
    secret: str | None = None,
    **claims: Any,
) -> str:
    now = int(time.time())
    body = {"role": role, "iat": now, "exp": now + expires_in, **claims}
    return jwt.encode(body, secret or _env("JWT_SECRET"), algorithm="HS256")


class Sql:
    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self.conn = conn

    async def __call__(self, query: str, params: tuple | None = None) -> None:
        await self.conn.execute(query, params)

    async def ensure_roles(self) -> None:
        for role in ("anon", "authenticated"):
            await self(
                f"""DO $$ BEGIN CREATE ROLE {role} NOLOGIN;
                EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"""
            )

    async def create_table(
        self, name: str, columns: str, replica_identity: str = "DEFAULT"
    ) -> None:
        await self(f'CREATE TABLE public."{name}" ({columns})')
        await self(f'ALTER TABLE public."{name}" REPLICA IDENTITY {replica_identity}')
        await self(f'GRANT SELECT ON public."{name}" TO anon, authenticated')


@pytest.fixture
async def sql():
    conn = await psycopg.AsyncConnection.connect(_env("DATABASE_URL"), autocommit=True)
    s = Sql(conn)
    await s.ensure_roles()
    try:
        yield s
    finally:
        await conn.close()


class Log:
    """Things that happened, appended from client callbacks, with waiting on top."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def push(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def until(
        self, predicate: Callable[[list[Any]], bool], timeout: float = WAIT_S, what: str = "the condition"
    ) -> list[Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self.items):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} on {self.label}; got {self.items!r}"[:2000]
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.items

    async def count(self, n: int, timeout: float = WAIT_S) -> list[Any]:
        await self.until(lambda items: len(items) >= n, timeout, f"{n} item(s)")
        return self.items[:n]


@pytest.fixture
async def clients():
    """Factory for AsyncRealtimeClient; every client is closed at the end of the test."""
    made: list[AsyncRealtimeClient] = []

    def make(url: str, token: str, **kwargs: Any) -> AsyncRealtimeClient:
        client = AsyncRealtimeClient(url, token, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            await asyncio.wait_for(client.close(), 5)
        except Exception:
            pass


async def subscribe(channel) -> Log:
    """Subscribes and waits for SUBSCRIBED; returns the log of every status reported."""
    statuses = Log(f"statuses of {channel.topic}")

    def on_status(status, err) -> None:
        statuses.push((str(status.value if hasattr(status, "value") else status), str(err) if err else None))

    try:
        await asyncio.wait_for(channel.subscribe(on_status), WAIT_S + 5)
    except asyncio.TimeoutError:
        raise AssertionError(f"{channel.topic}: subscribe() did not settle; statuses {statuses.items}") from None
    await statuses.count(1)
    assert statuses.items[0][0] == "SUBSCRIBED", f"{channel.topic}: {statuses.items}"
    return statuses


def change_view(payload: dict[str, Any]) -> dict[str, Any]:
    """The change's `data` with commit_timestamp and columns checked and removed."""
    data = dict(payload["data"])
    ts = data.pop("commit_timestamp")
    assert COMMIT_TS.match(ts), ts
    columns = data.pop("columns")
    assert isinstance(columns, list) and all(set(c) == {"name", "type"} for c in columns), columns
    return data
