"""Row changes, broadcast and presence from Python with the official client, against walcast.

    pip install -r requirements.txt && python listen.py   (with `walcast demo` running; Ctrl-C to stop)

WALCAST_URL / WALCAST_KEY point it elsewhere (KEY: a JWT signed with walcast's JWT_SECRET).
"""
import asyncio
import json
import os
import urllib.request

from realtime import AsyncRealtimeClient


async def main() -> None:
    url = os.environ.get("WALCAST_URL", "http://localhost:4000")
    key = os.environ.get("WALCAST_KEY") or json.load(  # `walcast demo` hands out tokens
        urllib.request.urlopen(f"{url}/demo/token?user=python"))["token"]
    client = AsyncRealtimeClient(f"{url}/realtime/v1", key)
    await client.connect()

    todos = client.channel("todos")
    def on_change(change: dict) -> None:
        data = change["data"]
        print(data["type"].value, data.get("record") or data.get("old_record"))

    todos.on_postgres_changes("*", schema="public", table="todos", callback=on_change)
    await todos.subscribe(lambda status, err: print("todos:", status.value, err or ""))

    room = client.channel("room:lobby", {"config": {"private": True, "presence": {"key": "python"}}})
    room.on_presence_sync(lambda: print("online:", [m[0]["name"] for m in room.presence_state().values()]))
    room.on_broadcast("cursor", lambda m: print("cursor", m["payload"]["name"], m["payload"]["x"], m["payload"]["y"]))
    await room.subscribe(lambda status, err: print("room:", status.value, err or ""))
    await room.track({"name": "python script", "color": "#3572a5"})
    await room.send_broadcast("hello", {"from": "python"})

    await asyncio.Event().wait()  # until Ctrl-C


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
