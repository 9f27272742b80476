"""`python -m tokenwire.bench`: the same as `tokenwire-bench` and `tokenwire bench`."""

from tokenwire.bench.cli import main

raise SystemExit(main())
