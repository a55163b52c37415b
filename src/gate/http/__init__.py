"""Gate's own HTTP/1.1 layer, with nothing of Anthropic in it.

- ``gate.http.server``: ``HttpServer``, ``Router``, ``Request``, ``Response``, ``StreamResponse`` (the listening side:
  framing, limits, deadlines, flow control).
- ``gate.http.client``: ``Pool``, ``UpstreamResponse``, ``ClientError``, ``ConnectError``, ``ResponseHeadTooLarge``
  (pooled keep-alive connections to one origin, TLS, egress proxies, limits on what upstream sends).
- ``gate.http.headers``: ``decode_fields``, ``content_length`` (header fields read alike on both sides).
"""
