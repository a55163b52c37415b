"""Who is calling.

- ``gate.identity.auth``: ``Authenticator`` (company JWTs verified against a JWKS), ``Identity``, ``AuthError``.
- ``gate.identity.devauth``: development key pair and tokens for ``make run`` without an identity provider.
- ``gate.identity.sessions``: ``SessionTokens``, Gate's own session tokens (minted at sign-in, verified by ``auth``).
- ``gate.identity.signin``: Claude Code's gateway sign-in (``service.SignIn``: device flow, IdP, token endpoint).
"""
