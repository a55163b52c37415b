"""A local OTLP/HTTP sink: accepts every POST with 200 and counts the bytes (for the overhead measurement)."""

import sys

from aiohttp import web

counts = {"requests": 0, "bytes": 0}


async def handle(request: web.Request) -> web.Response:
    body = await request.read()
    counts["requests"] += 1
    counts["bytes"] += len(body)
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(counts)


app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_get("/_stats", stats)
app.router.add_post("/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
