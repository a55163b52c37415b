"""What a caller may do: ``gate.policy.models`` (model allowlists by group), ``gate.policy.managed`` (Claude Code
managed settings by group), ``gate.policy.groups`` (which policies apply to a caller)."""
