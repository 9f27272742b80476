"""The engine service's single source of defaults: the CLI generates its flags and environment variables from
these dataclasses (the server's, the engine's, the KV cache's and the scheduler's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenwire.serving.config import GrpcServerConfig
from tokenwire.serving.model_resolver import DEFAULT_MODEL


# The fields' trailing comments are their flags' help texts (serving/cli_env.py): kept on one line each.
# fmt: off
@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16                 # tokens per KV block
    kv_cache_memory_gb: float = 1.0      # memory budget for the whole KV pool (all layers, K and V)
    num_blocks: int | None = None        # overrides the budget when set (tests use it to force preemption)
    enable_prefix_cache: bool = True     # reuse KV blocks of identical token-id prefixes
    kv_cache_dtype: str = "auto"         # "auto" (the model's); "bfloat16"/"float16" under a float32 model: half the bytes, not bit-exact


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64               # bound on running requests
    max_num_batched_tokens: int = 512    # per-step token budget (prefill chunks + decodes)
    enable_chunked_prefill: bool = True  # split long prompts across steps under the budget
    speculative: str = "off"             # "ngram": prompt-lookup drafts verified in the step's forward (greedy and sampled requests; see README), "off"
    num_speculative_tokens: int = 3      # drafts per sequence and step (3 keeps the verify rows within the few-row GEMV)
    ngram_min: int = 2                   # shortest n-gram that may propose drafts
    ngram_max: int = 4                   # longest n-gram tried first
    speculative_max_num_seqs: int = 4    # draft only while at most this many sequences run (a big batch gains little)


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL           # resolver name, local folder or hub id
    device: str = "auto"                 # "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"                  # "auto" (fastest on this machine), "float32", "bfloat16", "float16"
    max_model_len: int | None = None     # defaults to the model's own context length
    max_new_tokens_cap: int = 4096       # the largest max_new_tokens a request may ask for
    max_logprobs: int = 20               # the largest top-n logprobs a request may ask for
    max_grammar_compile_s: float = 10.0  # a constraint taking longer to compile is refused (INVALID_ARGUMENT); its compile process is killed
    max_grammar_compile_mib: int = 1024  # address space a constraint's compile process may grow by; past it the constraint is refused
    trust_remote_code: bool = False      # never run code shipped with a checkpoint unless asked
    chat_template: str = ""              # the tokenizer service's --chat-template: part of the tokenizer's fingerprint, so both must agree
    seed: int = 0                        # seeds requests that give none, so runs are reproducible
    native_kernels: bool = True          # CPU: fused kernels compiled on first use into $TOKENWIRE_HOME/kernels (off: torch ops)
    few_row_gemv: bool = True            # CPU: GEMMs of 1-4 rows (one stream, a few) on a plain weight copy: faster, the linear layers' memory twice
    model_impl: str = "auto"             # forward: "auto" (tokenwire's own where it knows the architecture, else transformers' modules), "native" (refuse others), "transformers" (the fallback for any causal LM)
    quantization: str = "auto"           # linear weights: "auto" (a GGUF file's own 4/8-bit blocks, else dense), "gguf", "int8" (quantized at load), "none" (dense)
    quantized_dense_copy: bool = True    # quantized weights: also a de-quantized copy for batches and prefill (oneDNN GEMMs); off: the blocks alone, the least memory, slower batches
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class ServerConfig(GrpcServerConfig):
    port: int = 50052                    # 0 picks a free port (logged)
    drain_grace_s: float = 30.0          # after SIGTERM, how long in-flight requests may still finish
    max_pending_requests: int = 1024     # requests in flight before new ones get RESOURCE_EXHAUSTED
    max_waiting_requests: int = 512      # accepted requests not yet generating before new ones get RESOURCE_EXHAUSTED
    core_stall_timeout_s: float = 10.0   # health is NOT_SERVING while work waits and the engine core has not replied for this long
# fmt: on
