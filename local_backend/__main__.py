"""`python -m local_backend serve ...`, the same as `klein-local serve ...`."""

from local_backend.cli import main

raise SystemExit(main())
