"""What a caller may do: spend caps and rate limits, enforced before the upstream call.

Public surface: :class:`~gate.policy.limits.Limits` (``admit`` -> ``Admission`` | ``Refusal``, ``standing``),
:class:`~gate.policy.admin.SpendLimitsApi` (the admin routes) and :class:`~gate.policy.periods.Windows`.
"""
