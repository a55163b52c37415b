"""Per-call cost of Authenticator.authenticate, cached and uncached, RS256 (2048) and ES256."""

# Run: .venv/bin/python benchmarks/micro/auth_verify.py

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.jwks import JwksServer

from gate.identity.auth import Authenticator
from gate.settings import JwtSettings


async def per_call(auth: Authenticator, header: str, n: int) -> float:
    best = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            await auth.authenticate(header, None)
        best.append((time.perf_counter() - start) / n)
    return min(best) * 1e6, statistics.median(best) * 1e6


async def main() -> None:
    async with JwksServer() as idp:
        idp.add_key("RSA", "RS256", "rsa")
        idp.add_key("EC", "ES256", "ec")
        cached = Authenticator(JwtSettings(jwk_set_uri=idp.url), dev_auth=False)
        uncached = Authenticator(JwtSettings(jwk_set_uri=idp.url, cache_size=0), dev_auth=False)
        await cached.start()
        await uncached.start()
        for kid in ("rsa", "ec"):
            header = f"Bearer {idp.mint(kid=kid, ttl=3600)}"
            print(f"token length {len(header) - 7}")
            lo, med = await per_call(uncached, header, 2_000)
            print(f"{idp.key(kid).alg} uncached: best {lo:.1f} us/call, median {med:.1f} us/call")
            lo, med = await per_call(cached, header, 50_000)
            print(f"{idp.key(kid).alg} cached:   best {lo:.2f} us/call, median {med:.2f} us/call")
        await cached.close()
        await uncached.close()


asyncio.run(main())
