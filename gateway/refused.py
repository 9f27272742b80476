"""OpenAI parameters the gateway knows and does not serve: a 400 naming the parameter, never a silent drop
(a parameter it does not know at all is ignored with a warning, routes._warn_unknown). A value that asks
for nothing (null, `modalities: ["text"]`) passes. Parameters a route's pydantic model refuses itself
(completions' `suffix`, `best_of` other than `n`) are checked where that route is answered."""

from __future__ import annotations

from collections.abc import Callable

from tokenwire.gateway.errors import bad_request

_SET: Callable[[object], bool] = lambda value: value is not None  # noqa: E731

# route path -> parameter -> whether the value asks for something the gateway does not do
REFUSED: dict[str, dict[str, Callable[[object], bool]]] = {
    "/v1/chat/completions": {
        "audio": _SET,
        "modalities": lambda value: value not in (None, ["text"]),
        "prediction": _SET,
        "web_search_options": _SET,
    },
}


def check(path: str, body: dict) -> None:
    for name, refused in REFUSED.get(path, {}).items():
        if name in body and refused(body[name]):
            raise bad_request(name, "is not supported by this server")


def names(path: str) -> set[str]:
    return set(REFUSED.get(path, {}))
