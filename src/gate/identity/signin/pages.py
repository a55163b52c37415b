"""The few HTML pages a person sees while signing Claude Code in: the user-code form and the outcomes.

Plain strings with every interpolated value escaped; the pages load nothing (no script, no style sheet) and are
served with a strict Content-Security-Policy, ``X-Frame-Options: DENY`` and ``no-store``.
"""

from __future__ import annotations

from html import escape

from gate.http.server import Response

__all__ = ["message_page", "user_code_page"]

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}"
    "input{font-size:1.4rem;letter-spacing:.2rem;text-transform:uppercase;width:12rem;padding:.3rem}"
    "button{font-size:1.1rem;padding:.4rem 1.2rem;margin-left:.5rem}.muted{color:#666;font-size:.9rem}"
)


def _page(title: str, body: str, *, status: int, form_action: str = "'none'") -> Response:
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head>'
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    csp = f"default-src 'none'; style-src 'unsafe-inline'; form-action {form_action}; frame-ancestors 'none'"
    return Response(
        status=status,
        text=html,
        content_type="text/html",
        headers={
            "Content-Security-Policy": csp,
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )


def user_code_page(prefill: str, *, idp_origin: str | None, error: str | None = None, status: int = 200) -> Response:
    # The code is only pre-filled, never submitted for the person (RFC 8628 section 5.4): they compare it with
    # the one Claude Code shows, then confirm.
    notice = f'<p role="alert"><strong>{escape(error)}</strong></p>' if error else ""
    body = (
        f"{notice}<p>Enter the code that Claude Code shows in your terminal, check that it matches, then continue "
        "to sign in with your company account.</p>"
        '<form method="post" action="/device">'
        f'<input name="user_code" value="{escape(prefill)}" autocomplete="off" autofocus required '
        'aria-label="User code" maxlength="32"><button type="submit">Continue</button></form>'
        '<p class="muted">Only continue if you started this sign-in yourself, in Claude Code.</p>'
    )
    action = "'self'" + (f" {idp_origin}" if idp_origin else "")
    return _page("Sign in to Claude Code", body, status=status, form_action=action)


def message_page(title: str, text: str, *, status: int) -> Response:
    return _page(title, f"<p>{escape(text)}</p>", status=status)
