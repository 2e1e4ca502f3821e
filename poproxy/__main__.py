"""`python -m poproxy` runs the `poproxy` command."""

from poproxy.cli import main

raise SystemExit(main())
