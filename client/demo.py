"""`make demo`: start the tokenizer and engine services, stream a real SmolLM2 chat completion to the
terminal through the SDK, print what it cost, and stop both services.

    python -m tokenwire.client.demo [--prompt TEXT] [--model NAME_OR_PATH] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import sys
import time

from tokenwire.client.sync_client import Client
from tokenwire.client.types import GenerationChunk
from tokenwire.serving.launcher import LocalServices

DEFAULT_PROMPT = "What is the capital of France? Answer in two sentences."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--model", default="smollm2-135m", help="model for both services (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    print(f"starting tokenwire-tokenizer and tokenwire-engine ({args.model}) ...", flush=True)
    started = time.monotonic()
    with LocalServices(args.model) as services:
        print(
            f"ready in {time.monotonic() - started:.1f}s: tokenizer {services.tokenizer_address}, "
            f"engine {services.engine_address} (logs in {services.log_dir})\n",
            flush=True,
        )
        with Client(services.tokenizer_address, services.engine_address) as client:
            _chat(client, args.prompt, args.max_new_tokens)
        print("\nstopping the services ...", flush=True)
    print("done.")
    return 0


def _chat(client: Client, prompt: str, max_new_tokens: int) -> None:
    print(f"user: {prompt}\nassistant: ", end="", flush=True)
    last: GenerationChunk | None = None
    started = time.monotonic()
    for chunk in client.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, temperature=0.0):
        print(chunk.text, end="", flush=True)
        last = chunk
    elapsed = time.monotonic() - started
    print("\n")
    usage, timings = last.usage, last.timings
    print(
        f"[{last.finish_reason.value}] {usage.prompt_tokens} prompt + {usage.completion_tokens} completion "
        f"tokens in {elapsed:.2f}s ({usage.completion_tokens / elapsed:.1f} tok/s), "
        f"time to first token {timings.time_to_first_token_s * 1000:.0f} ms"
    )
    stats = client.model_info().stats
    print(
        f"engine: {stats.num_prompt_encodes} prompts encoded by the engine (the tokenizer service "
        f"encoded this one), {stats.num_free_kv_blocks}/{stats.num_kv_blocks} KV blocks free"
    )


if __name__ == "__main__":
    sys.exit(main())
