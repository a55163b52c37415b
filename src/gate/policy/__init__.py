"""What a caller may do.

- ``gate.policy.groups`` (``PolicyBook``: which policies apply to a caller), ``gate.policy.models`` (model
  allowlists by group), ``gate.policy.managed`` (Claude Code managed settings by group).
- ``gate.policy.limits`` (``Limits``: ``admit`` -> ``Admission`` | ``Refusal``, ``standing``): spend caps and rate
  limits, enforced before the upstream call; ``gate.policy.admin`` (``SpendLimitsApi``, the admin routes) and
  ``gate.policy.periods`` (``Windows``).
"""
