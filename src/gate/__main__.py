"""``python -m gate``: the same as the ``gate`` command."""

from gate.cli import main

raise SystemExit(main())
