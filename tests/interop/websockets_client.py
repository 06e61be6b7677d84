"""Publish/subscribe check with the `websockets` package, a client written outside this project.

Usage: python3 websockets_client.py URL MODE
  both        subscribe and publish on two connections, then check the delivery
  subscriber  subscribe, print "subscribed", then wait for and check the delivery
  publisher   publish once and close
Exits 0 on success and 1 with a message on stderr otherwise; gives up after 10 s.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import ClientConnection, connect

# The frames are sent exactly as written here.
SUBSCRIBE = '{"action":"SUBSCRIBE","topic":"market_updates"}'
PUBLISH = (
    '{"action":"PUBLISH","topic":"market_updates",'
    '"data":{"symbol":"BTC/USD","price":64000}}'
)
EXPECTED_DATA = {"symbol": "BTC/USD", "price": 64000}
TIMEOUT_SECONDS = 10


async def subscribe(ws: ClientConnection) -> None:
    await ws.send(SUBSCRIBE)
    reply = json.loads(await ws.recv())
    expected = {"type": "subscribed", "topic": "market_updates"}
    if reply != expected:
        raise AssertionError(f"SUBSCRIBE was answered with {reply}, expected {expected}")


async def expect_delivery(ws: ClientConnection) -> None:
    text = await ws.recv()
    if not isinstance(text, str):
        raise AssertionError(f"received a binary message: {text!r}")
    message = json.loads(text)
    if message.get("type") != "message" or message.get("topic") != "market_updates":
        raise AssertionError(f"unexpected delivery {message}")
    if message.get("data") != EXPECTED_DATA:
        raise AssertionError(f"delivery data {message.get('data')}, expected {EXPECTED_DATA}")


async def publish(url: str) -> None:
    # Leaving the block sends a normal close after the PUBLISH, so the node reads it first.
    async with connect(url) as ws:
        await ws.send(PUBLISH)


async def run(url: str, mode: str) -> None:
    if mode == "publisher":
        await publish(url)
    elif mode in ("both", "subscriber"):
        async with connect(url) as subscriber:
            await subscribe(subscriber)
            if mode == "both":
                await publish(url)
            else:
                print("subscribed", flush=True)
            await expect_delivery(subscriber)
    else:
        raise ValueError(f"unknown mode {mode!r}: expected both, subscriber or publisher")
    print("ok", flush=True)


def main() -> int:
    url, mode = sys.argv[1], sys.argv[2]
    try:
        asyncio.run(asyncio.wait_for(run(url, mode), TIMEOUT_SECONDS))
    except Exception as error:  # Report any failure as exit 1 with the reason.
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
