"""Who is calling.

- ``gate.identity.auth``: ``Authenticator`` (company JWTs verified against a JWKS), ``Identity``, ``AuthError``.
- ``gate.identity.devauth``: development key pair and tokens for ``make run`` without an identity provider.
"""
