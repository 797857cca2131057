"""``python -m dynaflow``: the same as the ``dynaflow`` command."""

from dynaflow.cli import main

raise SystemExit(main())
