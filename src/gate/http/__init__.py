"""Gate's own HTTP/1.1 layer, with nothing of Anthropic in it.

- ``gate.http.server``: ``HttpServer``, ``Router``, ``Request``, ``Response``, ``StreamResponse`` (the listening side:
  framing, limits, deadlines, flow control).
- ``gate.http.client``: ``Pool``, ``UpstreamResponse``, ``ClientError``, ``ConnectError`` (pooled keep-alive
  connections to one origin, TLS, egress proxies).
"""
