"""Broadcast and presence through the official Python client (vsn 1.0.0 JSON frames)."""

from __future__ import annotations

from e2e_support import Log, mint_token, subscribe


def _config(*, self_: bool = False, presence_key: str = "", presence: bool = False) -> dict:
    return {
        "config": {
            "broadcast": {"ack": False, "self": self_},
            "presence": {"key": presence_key, "enabled": presence},
            "private": False,
        }
    }


async def test_broadcast_to_others_and_self_then_over_http(realtime_url, clients, sfx):
    topic = f"py-bc-{sfx}"
    sender = clients(realtime_url, mint_token()).channel(topic, _config(self_=True))
    other = clients(realtime_url, mint_token()).channel(topic, _config())
    at_sender, at_other = Log("sender"), Log("other")
    sender.on_broadcast("msg", at_sender.push)
    other.on_broadcast("msg", at_other.push)
    await subscribe(sender)
    await subscribe(other)

    await sender.send_broadcast("msg", {"n": 1, "text": "héllo"})
    [got] = await at_other.count(1)
    assert got["event"] == "msg"
    assert got["payload"] == {"n": 1, "text": "héllo"}
    # `self: true`: the sender hears its own message too.
    [own] = await at_sender.count(1)
    assert own["payload"] == {"n": 1, "text": "héllo"}

    # The REST endpoint (POST /realtime/v1/api/broadcast) reaches every socket on the topic.
    await other.http_send("msg", {"n": 2})
    await at_other.until(lambda items: any(i["payload"] == {"n": 2} for i in items), what="the HTTP broadcast")
    await at_sender.until(lambda items: any(i["payload"] == {"n": 2} for i in items), what="the HTTP broadcast")


async def test_presence_sync_join_update_and_leave(realtime_url, clients, sfx):
    topic = f"py-presence-{sfx}"
    alice = clients(realtime_url, mint_token(sub="alice")).channel(
        topic, _config(presence_key="alice", presence=True)
    )
    bob_client = clients(realtime_url, mint_token(sub="bob"))
    bob = bob_client.channel(topic, _config(presence_key="bob", presence=True))
    joins, leaves, syncs = Log("joins seen by alice"), Log("leaves seen by alice"), Log("syncs")
    alice.on_presence_join(lambda key, _current, new: joins.push((key, new)))
    alice.on_presence_leave(lambda key, _current, left: leaves.push((key, left)))
    alice.on_presence_sync(lambda: syncs.push(True))
    await subscribe(alice)
    await subscribe(bob)

    await alice.track({"status": "online"})
    await bob.track({"status": "away"})

    def statuses(key: str) -> list:
        return [p.get("status") for p in alice.presence_state().get(key, [])]

    await joins.until(lambda items: any(k == "bob" for k, _ in items), what="bob's join")
    await syncs.until(lambda _: statuses("bob") == ["away"] and statuses("alice") == ["online"], what="both in the state")
    assert set(alice.presence_state()) == {"alice", "bob"}
    assert all("presence_ref" in p for p in alice.presence_state()["bob"])

    # An update is a join of the new meta and a leave of the old one.
    await bob.track({"status": "online"})
    await syncs.until(lambda _: statuses("bob") == ["online"], what="bob's update")
    assert any(k == "bob" and [p.get("status") for p in left] == ["away"] for k, left in leaves.items)

    # A client that closes its socket leaves.
    await bob_client.close()
    await leaves.until(
        lambda items: any(k == "bob" and [p.get("status") for p in left] == ["online"] for k, left in items),
        what="bob's leave",
    )
    await syncs.until(lambda _: "bob" not in alice.presence_state(), what="bob gone from the state")
    assert statuses("alice") == ["online"]
