"""Claude Code's gateway sign-in served by Gate: ``service.SignIn`` (routes and flow), ``idp.IdentityProvider``
(the company IdP over OpenID Connect), ``grants.DeviceGrants`` (RFC 8628 state in the store), ``pages`` (HTML)."""
