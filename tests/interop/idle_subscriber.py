"""Subscribe with the `websockets` library, print the local address, then read until closed.

Usage: python3 idle_subscriber.py ws://127.0.0.1:PORT/ TOPIC

The heartbeat test stops this process with SIGSTOP, so the node's pings go unanswered.
The library replies to pings by itself while the process runs. Its own pings are turned off so
that only the node's heartbeat is exercised.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def main(url: str, topic: str) -> None:
    async with connect(url, ping_interval=None, open_timeout=10) as ws:
        await ws.send(json.dumps({"action": "SUBSCRIBE", "topic": topic, "id": 1}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        if reply.get("type") != "subscribed":
            sys.exit(f"SUBSCRIBE {topic!r} was answered with {reply}")
        host, port = ws.local_address[:2]
        print(json.dumps({"local_addr": f"{host}:{port}"}), flush=True)
        async for _ in ws:
            pass


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
