"""Logging for both services: plain text for people, one JSON object per line for log pipelines.

Every record carries the id of the request being served, if any. The id travels as gRPC metadata
`x-request-id` (the SDK sets one per call, the same on every RPC of that call, so the tokenizer's and the
engine's lines of one generation share it); `RpcObserver` binds it to `request_id_var` for the RPC's task,
and `asyncio.to_thread` copies it into worker threads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import TextIO

LOG_FORMATS = ("text", "json")
request_id_var: ContextVar[str | None] = ContextVar("tokenwire_request_id", default=None)

# LogRecord's own attributes; anything else on a record came from `extra=` and goes into the JSON.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` (None outside a request) so both formats can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id"?, ...extra, "exc_info"?}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request_id={request_id}]" if request_id else line


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one stream handler in the chosen format."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # `warnings.warn` output becomes records too, in the same format
    if fmt == "json":
        # Progress bars (model loading) are not records and would break one-object-per-line; set before
        # transformers is imported, which both services do only after this.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def add_logging_arguments(parser) -> None:
    """`--log-level` and `--log-format`, the same on both services."""
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text, or json: one JSON object per line (default: %(default)s)",
    )


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
