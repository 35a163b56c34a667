"""Parity options through the official Python client (vsn 1.0.0): `match`/`imatch` filters
(Postgres's ~ and ~*) and `config.broadcast.replication_ready`. The client has no
`postgres_changes_options`, so `wait` is covered by the node suite."""

from __future__ import annotations

from realtime import RealtimePostgresChangesListenEvent as Ev

from e2e_support import Log, mint_token, subscribe

VALUES = ["apple", "Apple pie", "banana", "abcz", "ABCZ", "foo bar", "foobar", "café", "CAFÉ", None]

# filter → the SQL condition Postgres evaluates for the expectation
CASES = [
    ("s=match.^a.*z$", "s ~ '^a.*z$'"),
    ("s=imatch.^apple", "s ~* '^apple'"),
    (r"s=match.\mbar\M", r"s ~ '\mbar\M'"),
    ("s=imatch.é", "s ~* 'é'"),
    ("s=not.match.^a", "NOT (s ~ '^a')"),
]


async def test_match_and_imatch_filters(realtime_url, sql, clients, sfx):
    table = f"py_regex_{sfx}"
    fence = f"py_regex_fence_{sfx}"
    await sql.create_table(table, "id int4 PRIMARY KEY, s text")
    await sql.create_table(fence, "id int4 PRIMARY KEY")
    client = clients(realtime_url, mint_token())
    channel = client.channel(f"py-regex-{sfx}")
    logs = []
    for f, _ in CASES:
        log = Log(f)
        channel.on_postgres_changes(Ev.Insert, log.push, table=table, schema="public", filter=f)
        logs.append(log)
    fence_events = Log("fence")
    channel.on_postgres_changes(Ev.Insert, fence_events.push, table=fence, schema="public")
    await subscribe(channel)

    for i, s in enumerate(VALUES, start=1):
        await sql(f'INSERT INTO public."{table}" (id, s) VALUES (%s, %s)', (i, s))
    await sql(f'INSERT INTO public."{fence}" (id) VALUES (1)')
    await fence_events.count(1)

    for (f, condition), log in zip(CASES, logs):
        cur = await sql.conn.execute(
            f'SELECT id FROM public."{table}" WHERE COALESCE({condition}, false) ORDER BY id'
        )
        expected = [r[0] for r in await cur.fetchall()]
        assert expected, f"{f} selects nothing: the case proves nothing"
        assert [e["data"]["record"]["id"] for e in log.items] == expected, f


async def test_replication_ready(realtime_url, clients, sfx):
    client = clients(realtime_url, mint_token())
    channel = client.channel(
        f"py-ready-{sfx}",
        {"config": {"broadcast": {"replication_ready": True}, "presence": None, "private": False}},
    )
    system = Log("system")
    channel.on_system(system.push)
    await subscribe(channel)
    [msg] = await system.count(1)
    assert msg.extension == "system"
    assert msg.status == "ok"
    assert msg.message == "Replication connection established"
    assert msg.channel == f"py-ready-{sfx}"
