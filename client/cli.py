"""`tokenwire`: talk to running services from the terminal.

    tokenwire generate "The capital of France is" [--ids] [--max-new-tokens N] [--temperature T] ...
    tokenwire chat [--system TEXT]          # interactive; an empty line or Ctrl-D ends it
    tokenwire info                          # model, tokenizer and live engine stats
    tokenwire bench [--workload P1] ...     # the benchmark (needs the engine extras: torch, transformers)

Service addresses come from --tokenizer / --engine, else $TOKENWIRE_TOKENIZER / $TOKENWIRE_ENGINE; a bearer
token for services started with auth comes from $TOKENWIRE_AUTH_TOKEN.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterable

from tokenwire.client.async_client import DEFAULT_ENGINE, DEFAULT_TOKENIZER
from tokenwire.client.errors import TokenwireError
from tokenwire.client.sync_client import Client
from tokenwire.client.types import GenerationChunk

# (flag, type, help); unset flags take the engine's defaults, except max_new_tokens (16 is too short here).
_SAMPLING_FLAGS = [
    ("max_new_tokens", int, "most tokens to generate (default: 256)"),
    ("temperature", float, "0 is greedy (engine default: 1)"),
    ("top_k", int, "keep the k most likely tokens; 0 disables"),
    ("top_p", float, "nucleus mass in (0, 1]"),
    ("min_p", float, "drop tokens below min_p x the top probability"),
    ("repetition_penalty", float, "> 1 discourages repeats"),
    ("seed", int, "same seed, same output"),
    ("min_tokens", int, "no eos or stop before this many tokens"),
]
_CLI_MAX_NEW_TOKENS = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire", description="tokenwire command-line client")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer service (default: %(default)s)")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, help="engine service (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline per request, seconds")
    parser.add_argument(
        "--tls-root-cert",
        default=None,
        help="PEM file of the CA that signed the services' TLS certificates (turns TLS on)",
    )
    # No --auth-token flag: a command line is visible to every user of the machine.
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="stream a completion of a prompt")
    generate.add_argument("prompt")
    chat = commands.add_parser("chat", help="interactive chat (the model's chat template)")
    chat.add_argument("--system", default=None, help="system message opening the conversation")
    for sub in (generate, chat):
        sub.add_argument("--ids", action="store_true", help="show token ids next to the text")
        for name, kind, text in _SAMPLING_FLAGS:
            sub.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
        sub.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
        sub.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past eos")
    commands.add_parser("info", help="show the served model and live engine stats")
    commands.add_parser(
        "bench", add_help=False, help="benchmark the engine and its baselines (tokenwire bench --help lists its flags)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # The benchmark (tokenwire.bench) sits above the SDK and needs torch: run it as its own process, so
        # that the SDK never imports it.
        return subprocess.call([sys.executable, "-m", "tokenwire.bench", *argv[1:]])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":  # reached only with options before it, which the benchmark does not take
        parser.error("bench takes its own flags and must come first: tokenwire bench [--engine-addr ...]")
    try:
        with Client(args.tokenizer, args.engine, timeout=args.timeout, tls_root_cert=args.tls_root_cert) as client:
            return {"generate": _generate, "chat": _chat, "info": _info}[args.command](client, args)
    except TokenwireError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _sampling(args: argparse.Namespace) -> dict:
    options = {name: getattr(args, name) for name, _, _ in _SAMPLING_FLAGS}
    options.update(stop=args.stop, ignore_eos=args.ignore_eos)
    if options["max_new_tokens"] is None:
        options["max_new_tokens"] = _CLI_MAX_NEW_TOKENS
    return {k: v for k, v in options.items() if v is not None}


def _generate(client: Client, args: argparse.Namespace) -> int:
    if args.ids:
        ids = client.encode(args.prompt)
        print(f"prompt ids: {ids}", file=sys.stderr)
        chunks = client.generate(token_ids=ids, **_sampling(args))
    else:
        chunks = client.generate(args.prompt, **_sampling(args))
    _print_stream(chunks, args.ids)
    return 0


def _chat(client: Client, args: argparse.Namespace) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = _print_stream(client.chat(messages, **_sampling(args)), args.ids)
        messages.append({"role": "assistant", "content": reply})


def _print_stream(chunks: Iterable[GenerationChunk], show_ids: bool) -> str:
    """Write text deltas as they arrive (with --ids, each chunk's ids too); a summary goes to stderr."""
    text, last = [], None
    for chunk in chunks:
        text.append(chunk.text)
        if show_ids:
            print(f"{list(chunk.token_ids)} {chunk.text!r}", flush=True)
        else:
            print(chunk.text, end="", flush=True)
        last = chunk
    if not show_ids:
        print()
    if last is not None and last.usage is not None:
        ttft = last.timings.time_to_first_token_s if last.timings else None
        print(
            f"[{last.finish_reason.value}: {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} "
            f"completion tokens" + (f", first token after {ttft * 1000:.0f} ms]" if ttft is not None else "]"),
            file=sys.stderr,
        )
    return "".join(text)


def _info(client: Client, args: argparse.Namespace) -> int:
    model, tokenizer = client.model_info(), client.tokenizer_info()
    print(
        f"model        {model.model} ({model.architecture}, {model.config.model_impl} forward), context"
        f" {model.max_model_len}, vocab {model.vocab_size}"
    )
    print(
        f"engine       {model.config.device}/{model.config.dtype}, {model.config.num_kv_blocks} KV blocks "
        f"of {model.config.block_size} tokens, up to {model.config.max_num_seqs} running"
    )
    match = "matches" if tokenizer.fingerprint == model.tokenizer_fingerprint else "DOES NOT MATCH"
    print(f"tokenizer    {tokenizer.model}, fingerprint {tokenizer.fingerprint[:16]}... ({match} the engine)")
    stats = model.stats
    print(
        f"live         {stats.num_running} running, {stats.num_waiting} waiting, "
        f"{stats.num_free_kv_blocks}/{stats.num_kv_blocks} blocks free, "
        f"{stats.num_prompt_encodes} engine-side encodes, prefix hit rate {stats.prefix_cache_hit_rate:.0%}"
    )
    if stats.num_draft_tokens:
        print(
            f"speculative  {stats.num_accepted_draft_tokens}/{stats.num_draft_tokens} drafts accepted "
            f"({stats.draft_acceptance_rate:.0%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
