"""`python -m tokenwire.gateway.healthcheck [HOST:PORT] [--timeout S] [--quiet]`: exit 0 when the gateway's
GET /health is 200 (both services SERVING), else 1. The compose healthcheck; needs no curl in the image."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def check(address: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout_s) as response:
            return response.status == 200, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return False, f"{error.code}: {error.read().decode(errors='replace')}"
    except OSError as error:
        return False, str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenwire.gateway.healthcheck",
        description="GET /health on the gateway: exit 0 when 200, else 1",
    )
    parser.add_argument("address", nargs="?", default="127.0.0.1:8000", help="host:port (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    ok, seen = check(args.address, args.timeout)
    if not args.quiet:
        print(f"{args.address}: {seen}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
