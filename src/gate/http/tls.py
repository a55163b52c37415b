"""TLS for Gate's own port (``server.ssl.*``): the server's ``SSLContext`` from PEM files, optional mutual TLS.

For deployments without a TLS-terminating ingress. The standard library's cipher choice is kept, TLS 1.2 is the
floor, client certificates are checked against ``trust-certificate`` alone (never the system's CAs), and only
HTTP/1.1 is offered over ALPN, since that is all Gate's server speaks.
"""

from __future__ import annotations

import ssl

from gate.settings import SslSettings

__all__ = ["server_context"]


def server_context(settings: SslSettings) -> ssl.SSLContext | None:
    """The context for the listening socket, or None when ``server.ssl.certificate`` is not set.

    Raises OSError naming the file when a certificate or key cannot be loaded.
    """
    if settings.certificate is None:
        return None
    # Not create_default_context(CLIENT_AUTH): it would also trust the system's CAs for client certificates.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(settings.certificate, settings.certificate_private_key)
    except OSError as exc:  # the standard library's message names no file
        files = ", ".join(f for f in (settings.certificate, settings.certificate_private_key) if f)
        raise OSError(f"server.ssl: cannot load the certificate and key from {files}: {exc}") from None
    client_auth = settings.client_auth or ("need" if settings.trust_certificate else "none")
    if client_auth != "none" and settings.trust_certificate is not None:  # settings refuse one without the other
        try:
            context.load_verify_locations(cafile=settings.trust_certificate)
        except OSError as exc:
            raise OSError(f"server.ssl: cannot load trust-certificate {settings.trust_certificate}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if client_auth == "need" else ssl.CERT_OPTIONAL
    return context
