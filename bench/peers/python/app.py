"""A FastAPI + Redis implementation of wsticket's ticket API.

It is a measuring stick for docs/BENCHMARKS.md, not part of wsticket: the
straightforward Python design that wsticket is compared with. It verifies
the bearer JWT with PyJWT (on `cryptography`) against a JWKS file, stores
the ticket in Redis with `SET EX`, and redeems it on `GET /ws` with `GETDEL`.
Run it with `run.sh`, which starts Redis and uvicorn on loopback.

Settings come from the environment: PEER_JWKS_FILE, PEER_ISSUER,
PEER_AUDIENCE, PEER_REDIS_URL and PEER_TICKET_TTL (seconds).
"""

import json
import os
import secrets
import string
import time
from datetime import datetime, timezone

import jwt
import redis.asyncio as redis
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse

ALPHABET = string.ascii_letters + string.digits
TICKET_LEN = 32
ALGORITHMS = ["RS256", "ES256", "EdDSA"]

ISSUER = os.environ["PEER_ISSUER"]
AUDIENCE = os.environ["PEER_AUDIENCE"]
TICKET_TTL = int(os.environ.get("PEER_TICKET_TTL", "30"))
REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6390/0")

with open(os.environ["PEER_JWKS_FILE"], encoding="utf-8") as jwks_file:
    KEYS = {
        key["kid"]: jwt.PyJWK(key).key for key in json.load(jwks_file)["keys"]
    }

app = FastAPI()
store = redis.from_url(REDIS_URL)


def error(status: int, code: str) -> JSONResponse:
    return JSONResponse({"error": code}, status_code=status)


@app.post("/websocket/ticket")
async def issue(request: Request) -> JSONResponse:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return error(401, "missing_token")
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = KEYS.get(kid)
        if key is None:
            return error(401, "invalid_token")
        claims = jwt.decode(
            token,
            key,
            algorithms=ALGORITHMS,
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        return error(401, "token_expired")
    except jwt.InvalidTokenError:
        return error(401, "invalid_token")

    ticket = "".join(secrets.choice(ALPHABET) for _ in range(TICKET_LEN))
    record = json.dumps({"sub": claims["sub"], "sid": claims.get("sid")})
    await store.set(f"ticket:{ticket}", record, ex=TICKET_TTL)
    expires_at = datetime.fromtimestamp(time.time() + TICKET_TTL, tz=timezone.utc)
    return JSONResponse(
        {
            "ticket": ticket,
            "expires_at": expires_at.isoformat(timespec="milliseconds"),
            "expires_in": TICKET_TTL,
        },
        headers={"cache-control": "no-store"},
    )


@app.websocket("/ws")
async def websocket(socket: WebSocket) -> None:
    ticket = socket.query_params.get("ticket", "")
    record = await store.getdel(f"ticket:{ticket}") if ticket else None
    if record is None:
        await socket.close(code=4401)
        return
    await socket.accept()
    await socket.send_text(json.dumps({"type": "authenticated", **json.loads(record)}))
    async for message in socket.iter_text():
        await socket.send_text(message)
