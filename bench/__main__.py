"""`python -m tokenwire.bench`: the same as `tokenwire-bench` and `tokenwire bench`."""

from tokenwire.bench.launch import main

raise SystemExit(main())
