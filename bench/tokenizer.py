"""Micro-benchmark: BatchEncode through the tokenizer service vs the same tokenizer in-process.

    python -m tokenwire.bench.tokenizer [--model smollm2-135m] [--texts 2048] [--batch 256]

The service runs as its own process (`tokenwire-tokenizer`, by the shared launcher), as deployed;
the client sends batches over localhost gRPC. Both sides are measured in this one run, on the same
texts, best of --repeats passes. The service calls the Rust tokenizer's `encode_batch_fast` (no
offsets), so it is compared both with `tokenizer(batch)` and with that same Rust call; the second
ratio is what the RPC costs (serialisation, transport, copies).
Also prints single-text Encode latency against an in-process call.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import grpc
from tokenwire.serving.launcher import TOKENIZER, start_service
from tokenwire.tokenizer.tokenizer import load_tokenizer
from tokenwire.v1 import tokenizer_pb2 as pb
from tokenwire.v1 import tokenizer_pb2_grpc

_WORDS = (
    "the model streams tokens while the scheduler batches requests; "
    "café naïve 東京 ☕ 🤗 def f(x): return x**2  \n\t KV-cache blocks are reused"
).split(" ")


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(8, 120))) for _ in range(n)]


def best_rate(fn, n_items: int, repeats: int) -> float:
    """Items per second of the fastest of `repeats` passes (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_items / min(times)


def latency_us(fn, calls: int) -> float:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenwire.bench.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-calls", type=int, default=500, help="single-text Encode calls timed")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    texts = make_texts(args.texts)
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    with start_service(TOKENIZER, ["--model", args.model]) as service:
        service.wait_serving()
        with grpc.insecure_channel(service.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            responses = [stub.BatchEncode(pb.BatchEncodeRequest(texts=b)) for b in batches]
            remote = [[list(e.ids) for e in response.encodings] for response in responses]
            assert remote == [tokenizer(b)["input_ids"] for b in batches], "service and in-process differ"

            local_rate = best_rate(lambda: [tokenizer(b)["input_ids"] for b in batches], len(texts), args.repeats)
            backend = tokenizer.backend_tokenizer  # the Rust call the service itself makes (no offsets)
            rust_rate = best_rate(
                lambda: [[e.ids for e in backend.encode_batch_fast(b)] for b in batches], len(texts), args.repeats
            )
            remote_rate = best_rate(
                lambda: [stub.BatchEncode(pb.BatchEncodeRequest(texts=b)) for b in batches], len(texts), args.repeats
            )
            local_us = latency_us(lambda: tokenizer(texts[0])["input_ids"], args.latency_calls)
            remote_us = latency_us(lambda: stub.Encode(pb.EncodeRequest(text=texts[0])), args.latency_calls)

    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    print(f"{len(texts)} texts, {tokens} tokens, batches of {args.batch}, best of {args.repeats}")
    print(f"BatchEncode, texts/s: in-process transformers tokenizer(batch) {local_rate:8.0f}")
    print(f"                      in-process Rust encode_batch_fast        {rust_rate:8.0f}")
    print(f"                      service over gRPC                        {remote_rate:8.0f}")
    print(
        f"service / in-process transformers: {remote_rate / local_rate:.2f}   "
        f"service / in-process Rust: {remote_rate / rust_rate:.2f}"
    )
    print(
        f"Encode (1 text, {len(texts[0])} chars) median latency: in-process {local_us:.0f} us, "
        f"service {remote_us:.0f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
