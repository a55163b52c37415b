"""Which configured policies apply to a caller: matched by group and e-mail domain, merged onto a catch-all.

A policy whose ``match`` is empty is part of the catch-all base (several are merged in order). Of the others, the
first whose groups (any of them) and e-mail domains (any of them) both fit the caller is merged onto the base; an
empty list in a ``match`` does not constrain. Resolutions are cached by (groups, domain): the request path asks
once per call and the answer changes only with the configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gate.identity.auth import Identity
from gate.settings import PolicySettings

__all__ = ["PolicyBook", "Resolved", "deep_merge"]

_CACHE_LIMIT: Final = 4096


@dataclass(frozen=True, slots=True)
class Resolved:
    """What applies to one caller: the policies' names, the model allowlist (None: any) and managed settings."""

    names: tuple[str, ...]
    models: tuple[str, ...] | None
    managed_settings: Mapping[str, Any] | None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` onto ``base``: objects merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class PolicyBook:
    def __init__(self, policies: Sequence[PolicySettings]) -> None:
        names = [p.name for p in policies]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"policies: names must be unique; repeated: {', '.join(repeated)}")
        self._base = [p for p in policies if not p.match.groups and not p.match.email_domains]
        self._specific = [p for p in policies if p.match.groups or p.match.email_domains]
        self._cache: dict[tuple[frozenset[str], str | None], Resolved | None] = {}

    def __bool__(self) -> bool:
        return bool(self._base or self._specific)

    @property
    def restricts_models(self) -> bool:
        return any(p.models is not None for p in (*self._base, *self._specific))

    def resolve(self, identity: Identity) -> Resolved | None:
        """The merged policy for this caller; None when no policy (not even a catch-all) applies."""
        domain = identity.email.rpartition("@")[2].lower() if identity.email and "@" in identity.email else None
        key = (identity.groups, domain)
        try:
            return self._cache[key]
        except KeyError:
            pass
        resolved = self._resolve(identity.groups, domain)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = resolved
        return resolved

    def _resolve(self, groups: frozenset[str], domain: str | None) -> Resolved | None:
        chosen = list(self._base)
        for policy in self._specific:
            match = policy.match
            if match.groups and not groups.intersection(match.groups):
                continue
            if match.email_domains and domain not in {d.lower().lstrip("@") for d in match.email_domains}:
                continue
            chosen.append(policy)
            break
        if not chosen:
            return None
        models: tuple[str, ...] | None = None
        settings: dict[str, Any] | None = None
        for policy in chosen:
            if policy.models is not None:
                models = tuple(policy.models)
            if policy.managed_settings is not None:
                settings = deep_merge(settings or {}, policy.managed_settings)
        return Resolved(tuple(p.name for p in chosen), models, settings)
