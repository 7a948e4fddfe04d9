#!/usr/bin/env python3
"""A Python app that terminates its own WebSockets and authenticates them with
wsticket's redeem API, in place of putting wsticket in front as a gateway.

The browser gets a ticket from wsticket (POST /websocket/ticket with its JWT)
and opens ws://APP/?ticket=<ticket> on this app. Before accepting, the app
redeems the ticket with one HTTP call to wsticket's admin listener. That uses
the ticket up, so it cannot open a connection through the gateway either.

Needs Python 3.9+ and `pip install websockets` (version 13 or later).
Start wsticket with `--admin-token-file FILE`, then:

    WSTICKET_ADMIN_URL=http://127.0.0.1:9090 \
    WSTICKET_ADMIN_TOKEN_FILE=FILE \
    python3 examples/redeem_app.py
"""

import asyncio
import json
import os
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import serve

ADMIN_URL = os.environ.get("WSTICKET_ADMIN_URL", "http://127.0.0.1:9090")
APP_PORT = int(os.environ.get("APP_PORT", "8765"))
with open(os.environ["WSTICKET_ADMIN_TOKEN_FILE"], encoding="utf-8") as token_file:
    ADMIN_TOKEN = token_file.read().strip()


class Rejected(Exception):
    """A ticket wsticket did not accept, with its HTTP status and error code."""

    def __init__(self, status, error):
        super().__init__(error)
        self.status = status
        self.error = error


def redeem(ticket, origin):
    """Redeem a ticket; return {"subject", "session", "claims", "expires_at"}."""
    body = json.dumps({"ticket": ticket, "origin": origin}).encode()
    request = urllib.request.Request(
        f"{ADMIN_URL}/v1/tickets/redeem",
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {ADMIN_TOKEN}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        error = json.load(err).get("error", "unknown_error")
        raise Rejected(err.code, error) from None


async def authenticate(connection, request):
    """Reject the upgrade unless its ticket redeems; keep the identity."""
    tickets = parse_qs(urlsplit(request.path).query).get("ticket", [])
    if len(tickets) != 1:
        return connection.respond(401, "missing_ticket\n")
    try:
        # urllib blocks, so the call runs on a worker thread.
        identity = await asyncio.to_thread(
            redeem, tickets[0], request.headers.get("Origin")
        )
    except Rejected as rejected:
        return connection.respond(rejected.status, f"{rejected.error}\n")
    except OSError:
        return connection.respond(503, "wsticket is unreachable\n")
    connection.identity = identity
    return None


async def handle(connection):
    """Greet the authenticated user, then echo."""
    identity = connection.identity
    greeting = {"hello": identity["subject"], "claims": identity["claims"]}
    await connection.send(json.dumps(greeting))
    async for message in connection:
        await connection.send(message)


async def main():
    async with serve(
        handle, "127.0.0.1", APP_PORT, process_request=authenticate
    ) as server:
        print(f"listening on ws://127.0.0.1:{APP_PORT}/?ticket=…", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
