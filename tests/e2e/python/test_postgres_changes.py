"""postgres_changes through the official Python client (which speaks vsn 1.0.0)."""

from __future__ import annotations

import asyncio
import json
import time

import websockets
from realtime import RealtimePostgresChangesListenEvent as Ev

from e2e_support import Log, change_view, mint_token, subscribe


async def test_connects_with_vsn_1(realtime_url, clients):
    client = clients(realtime_url, mint_token())
    url = client.endpoint_url()
    assert "/realtime/v1/websocket?" in url
    assert "vsn=1.0.0" in url
    await client.connect()
    assert client.is_connected


async def test_insert_update_delete_payloads(realtime_url, sql, clients, sfx):
    table = f"py_crud_{sfx}"
    await sql.create_table(table, "id int8 PRIMARY KEY, title text, big int8, price numeric(6,2)")
    client = clients(realtime_url, mint_token())
    channel = client.channel(f"py-crud-{sfx}")
    events = Log("changes")
    channel.on_postgres_changes(Ev.All, events.push, table=table, schema="public")
    await subscribe(channel)

    await sql(
        f'INSERT INTO public."{table}" (id, title, big, price) VALUES (1, %s, 9007199254740993, 1.50)',
        ("first",),
    )
    await sql(f'UPDATE public."{table}" SET title = %s WHERE id = 1', ("second",))
    await sql(f'DELETE FROM public."{table}" WHERE id = 1')
    ins, upd, dele = await events.count(3)

    for e in (ins, upd, dele):
        assert isinstance(e["ids"], list) and len(e["ids"]) == 1 and isinstance(e["ids"][0], int)
    assert ins["data"]["columns"] == [
        {"name": "id", "type": "int8"},
        {"name": "title", "type": "text"},
        {"name": "big", "type": "int8"},
        {"name": "price", "type": "numeric"},
    ]
    # Python's JSON keeps integers exact: the int8 arrives as 9007199254740993, not ...992.
    assert change_view(ins) == {
        "schema": "public",
        "table": table,
        "type": "INSERT",
        "record": {"id": 1, "title": "first", "big": 9007199254740993, "price": 1.5},
        "errors": None,
    }
    assert change_view(upd) == {
        "schema": "public",
        "table": table,
        "type": "UPDATE",
        "record": {"id": 1, "title": "second", "big": 9007199254740993, "price": 1.5},
        "old_record": {"id": 1},
        "errors": None,
    }
    assert change_view(dele) == {
        "schema": "public",
        "table": table,
        "type": "DELETE",
        "old_record": {"id": 1},
        "errors": None,
    }
    assert len(events.items) == 3


async def test_specific_events_and_filter(realtime_url, sql, clients, sfx):
    table = f"py_filter_{sfx}"
    fence = f"py_filter_fence_{sfx}"
    await sql.create_table(table, "id int4 PRIMARY KEY, n int4, s text", replica_identity="FULL")
    await sql.create_table(fence, "id int4 PRIMARY KEY")
    client = clients(realtime_url, mint_token(role="authenticated", sub="py-user"))
    channel = client.channel(f"py-filter-{sfx}")
    big_inserts = Log("inserts n>20")
    in_updates = Log("updates s in (a,b)")
    fence_events = Log("fence")
    channel.on_postgres_changes(Ev.Insert, big_inserts.push, table=table, schema="public", filter="n=gt.20")
    channel.on_postgres_changes(Ev.Update, in_updates.push, table=table, schema="public", filter="s=in.(a,b)")
    channel.on_postgres_changes(Ev.Insert, fence_events.push, table=fence, schema="public")
    await subscribe(channel)

    for i, n, s in [(1, 10, "a"), (2, 20, "b"), (3, 30, "c"), (4, 40, "a")]:
        await sql(f'INSERT INTO public."{table}" (id, n, s) VALUES (%s, %s, %s)', (i, n, s))
    await sql(f'UPDATE public."{table}" SET n = n + 1')
    await sql(f'INSERT INTO public."{fence}" (id) VALUES (1)')
    await fence_events.count(1)

    assert [e["data"]["record"] for e in big_inserts.items] == [
        {"id": 3, "n": 30, "s": "c"},
        {"id": 4, "n": 40, "s": "a"},
    ]
    assert [change_view(e) for e in in_updates.items] == [
        {
            "schema": "public",
            "table": table,
            "type": "UPDATE",
            "record": {"id": i, "n": n + 1, "s": s},
            "old_record": {"id": i, "n": n, "s": s},
            "errors": None,
        }
        for i, n, s in [(1, 10, "a"), (2, 20, "b"), (4, 40, "a")]
    ]


async def test_set_auth_keeps_the_channel_past_the_old_expiry(realtime_url, sql, clients, sfx):
    table = f"py_auth_{sfx}"
    await sql.create_table(table, "id int4 PRIMARY KEY")
    client = clients(realtime_url, mint_token())
    short_exp = int(time.time()) + 5
    await client.set_auth(mint_token(role="authenticated", expires_in=short_exp - int(time.time()), sub="u"))
    channel = client.channel(f"py-auth-{sfx}")
    events = Log("changes")
    system = Log("system")
    channel.on_postgres_changes(Ev.Insert, events.push, table=table, schema="public")
    channel.on_system(system.push)
    statuses = await subscribe(channel)

    await sql(f'INSERT INTO public."{table}" (id) VALUES (1)')
    await events.count(1)
    await client.set_auth(mint_token(role="authenticated", expires_in=3600, sub="u"))

    # Let the first token's expiry pass (plus a margin for the server's check).
    await asyncio.sleep(max(0.0, short_exp + 2 - time.time()))
    await sql(f'INSERT INTO public."{table}" (id) VALUES (2)')
    await events.count(2)
    assert [e["data"]["record"] for e in events.items] == [{"id": 1}, {"id": 2}]
    assert [s for s, _ in statuses.items] == ["SUBSCRIBED"]
    assert channel.is_joined


async def test_expiring_token_closes_the_channel(realtime_url, sql, clients, sfx):
    table = f"py_exp_{sfx}"
    await sql.create_table(table, "id int4 PRIMARY KEY")
    client = clients(realtime_url, mint_token(expires_in=4))
    channel = client.channel(f"py-exp-{sfx}")
    channel.on_postgres_changes(Ev.Insert, lambda _: None, table=table, schema="public")
    statuses = await subscribe(channel)
    # The client turns the system error into CHANNEL_ERROR and phx_close into CLOSED.
    await statuses.until(lambda items: any(s == "CLOSED" for s, _ in items), timeout=20, what="CLOSED")
    errors = [e for s, e in statuses.items if s == "CHANNEL_ERROR"]
    assert errors and "Token has expired" in errors[0], statuses.items
    assert channel.is_closed


async def test_forged_token_is_refused_with_401(realtime_url):
    # The same URL with a valid token is accepted, so the refusal below is about the token.
    async with websockets.connect(f"{realtime_url}/websocket?apikey={mint_token()}&vsn=1.0.0"):
        pass
    forged = mint_token(secret="definitely-not-the-secret-" + "x" * 32)
    try:
        async with websockets.connect(f"{realtime_url}/websocket?apikey={forged}&vsn=1.0.0"):
            raise AssertionError("the upgrade must be refused")
    except websockets.exceptions.InvalidStatus as e:
        assert e.response.status_code == 401
        assert e.response.body is not None
        assert json.loads(e.response.body) == {"error": "Failed to validate JWT signature"}
