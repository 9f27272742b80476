"""Both /metrics endpoints, scraped over HTTP after a few requests: the counters move as the traffic says.

Both servers run in this process on one event-loop thread, ports 0 (gRPC and metrics), each with its own
Prometheus registry. Requests go through the SDK: text via the tokenizer service (encoded there, never by
the engine), text straight to the engine (encoded by the engine), and token ids (encoded by no one).
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenwire.client import Client, InvalidRequestError
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from tokenwire.engine.edge.server import EngineServer
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.server import TokenizerServer

from tests.reference import ENGINE_DTYPE

NUM_BLOCKS = 128
LONG_PROMPT_IDS = list(range(100, 140))  # 40 ids: two full 16-token blocks the prefix cache can share
GREEDY = dict(temperature=0.0, max_new_tokens=5)


class Servers:
    """A tokenizer and an engine server, in-process, on one event-loop thread."""

    def __init__(self, model: str, scheduler: SchedulerConfig | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tokenizer, self.engine = self.run(self._start(model, scheduler or SchedulerConfig()))

    async def _start(self, model: str, scheduler: SchedulerConfig) -> tuple[TokenizerServer, EngineServer]:
        tokenizer = TokenizerServer(TokenizerServiceConfig(model=model, port=0, metrics_port=0))
        engine = EngineServer(
            EngineConfig(
                model=model, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=NUM_BLOCKS), scheduler=scheduler
            ),
            ServerConfig(port=0, metrics_port=0),
        )
        await tokenizer.start()
        await engine.start()
        await tokenizer.load()  # one after the other: transformers' lazy imports are not thread-safe
        await engine.load()
        return tokenizer, engine

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    async def _stop(self) -> None:
        await asyncio.gather(self.tokenizer.stop(0), self.engine.stop(0))

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(scope="module")
def servers(tiny_llama_dir):
    servers = Servers(tiny_llama_dir)
    yield servers
    servers.close()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from one /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def traffic(servers):
    """A known mix of requests; returns (tokenizer before, engine before, tokenizer after, engine after, usage)."""
    t_port, e_port = servers.tokenizer.metrics_endpoint.port, servers.engine.metrics_endpoint.port
    before = scrape(t_port), scrape(e_port)
    engine_address, tokenizer_address = f"127.0.0.1:{servers.engine.port}", f"127.0.0.1:{servers.tokenizer.port}"
    completions = []
    with (
        Client(tokenizer_address, engine_address, timeout=60) as sdk,
        Client(None, engine_address, timeout=60) as direct,
    ):
        completions += [sdk.complete(f"Tell me about {topic}", **GREEDY) for topic in ("cats", "dogs", "owls")]
        completions += [direct.complete(f"Straight to the engine {i}", **GREEDY) for i in range(2)]
        completions += [sdk.complete(token_ids=LONG_PROMPT_IDS, **GREEDY) for _ in range(2)]  # 2nd hits the cache
        with pytest.raises(InvalidRequestError):
            sdk.complete(token_ids=[1, 2, 3], temperature=-1.0)
    return (*before, scrape(t_port), scrape(e_port), [c.usage for c in completions])


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_prompt_encodes_happen_once_where_the_text_arrives(traffic):
    t0, e0, t1, e1, _ = traffic
    # 3 SDK text requests -> 3 encodes in the tokenizer service, none in the engine.
    assert delta(t0, t1, "tokenwire_tokenizer_prompt_encodes_total") == 3
    # 2 text requests sent straight to the engine -> 2 engine encodes; token-id requests cost none.
    assert delta(e0, e1, "tokenwire_engine_prompt_encodes_total") == 2
    assert value(e0, "tokenwire_engine_prompt_encodes_total") == 0  # warm-up used ids


def test_requests_are_counted_by_rpc_and_status_code(traffic):
    t0, e0, t1, e1, _ = traffic
    generate = dict(service="EngineService", rpc="Generate")
    assert delta(e0, e1, "tokenwire_rpc_requests_total", **generate, code="OK") == 7
    assert delta(e0, e1, "tokenwire_rpc_requests_total", **generate, code="INVALID_ARGUMENT") == 1
    assert delta(t0, t1, "tokenwire_rpc_requests_total", service="TokenizerService", rpc="Encode", code="OK") == 3
    assert delta(e0, e1, "tokenwire_rpc_duration_seconds_count", service="EngineService", rpc="Generate") == 8
    assert value(e1, "tokenwire_rpc_in_flight", **generate) == 0


def test_token_counters_match_the_usage_the_clients_saw(traffic):
    t0, e0, t1, e1, usages = traffic
    assert delta(e0, e1, "tokenwire_engine_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta(e0, e1, "tokenwire_engine_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta(e0, e1, "tokenwire_engine_cached_prompt_tokens_total") == sum(u.cached_prompt_tokens for u in usages)
    assert usages[-1].cached_prompt_tokens >= 32  # the repeated 40-id prompt reused two blocks
    finished = value(e1, "tokenwire_engine_requests_finished_total", finish_reason="length") + value(
        e1, "tokenwire_engine_requests_finished_total", finish_reason="stop"
    )
    assert finished == 7


def test_latency_histograms_observe_every_finished_request(traffic):
    _, e0, _, e1, usages = traffic
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "queue_wait_seconds"):
        assert delta(e0, e1, f"tokenwire_engine_{name}_count") == 7, name
        assert delta(e0, e1, f"tokenwire_engine_{name}_sum") > 0, name
    # Every token after a stream's first message is one inter-token gap.
    itl = delta(e0, e1, "tokenwire_engine_inter_token_latency_seconds_count")
    assert 0 < itl <= sum(u.completion_tokens - 1 for u in usages)


def test_engine_state_is_read_at_scrape_time(traffic):
    _, _, _, e1, _ = traffic
    total = value(e1, "tokenwire_engine_kv_blocks_total")
    assert total == NUM_BLOCKS
    assert value(e1, "tokenwire_engine_kv_blocks_used") + value(e1, "tokenwire_engine_kv_blocks_free") == total
    assert value(e1, "tokenwire_engine_requests_running") == 0
    assert value(e1, "tokenwire_engine_requests_waiting") == 0
    assert value(e1, "tokenwire_engine_requests_active") == 0
    hits, queried = (value(e1, f"tokenwire_engine_prefix_cache_{k}_tokens_total") for k in ("hit", "queried"))
    assert 32 <= hits <= queried
    assert value(e1, "tokenwire_engine_prefix_cache_hit_rate") == pytest.approx(hits / queried)


def test_each_server_has_its_own_registry(servers):
    tokenizer, engine = scrape(servers.tokenizer.metrics_endpoint.port), scrape(servers.engine.metrics_endpoint.port)
    assert not any(name.startswith("tokenwire_engine_") for name, _ in tokenizer)
    assert not any(name.startswith("tokenwire_tokenizer_") for name, _ in engine)


@pytest.fixture(scope="module")
def spec_servers(echo_llama_dir):
    """Servers with n-gram speculation over the tiny model that mostly repeats itself (drafts get accepted)."""
    servers = Servers(echo_llama_dir, SchedulerConfig(speculative="ngram"))
    yield servers
    servers.close()


def test_speculative_drafts_are_counted_in_model_info_and_metrics(spec_servers):
    port = spec_servers.engine.metrics_endpoint.port
    copy_heavy = LONG_PROMPT_IDS + LONG_PROMPT_IDS[:6]  # what follows was seen before
    with Client(None, f"127.0.0.1:{spec_servers.engine.port}", timeout=60) as client:
        before, scraped_before = client.model_info().stats, scrape(port)
        client.complete(token_ids=copy_heavy, temperature=0.0, max_new_tokens=24, ignore_eos=True)
        after, scraped_after = client.model_info().stats, scrape(port)
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_draft_tokens - before.num_accepted_draft_tokens
    assert 0 < accepted <= drafted
    assert after.draft_acceptance_rate == pytest.approx(after.num_accepted_draft_tokens / after.num_draft_tokens)
    assert delta(scraped_before, scraped_after, "tokenwire_engine_spec_draft_tokens_total") == drafted
    assert delta(scraped_before, scraped_after, "tokenwire_engine_spec_accepted_tokens_total") == accepted
    assert value(scraped_after, "tokenwire_engine_spec_acceptance_rate") == pytest.approx(after.draft_acceptance_rate)


def test_no_draft_is_counted_with_speculation_off(traffic):
    _, _, _, e1, _ = traffic
    assert value(e1, "tokenwire_engine_spec_draft_tokens_total") == 0
    assert value(e1, "tokenwire_engine_spec_acceptance_rate") == 0
