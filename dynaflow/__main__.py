"""``python -m dynaflow demo``."""

from dynaflow.cli import main

raise SystemExit(main())
