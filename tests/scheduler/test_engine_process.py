"""The offline API with the engine core in its own process gives what the in-process core gives."""
import pytest

from conftest import make_llm, random_prompts
from scheduler.llm import LLM
from scheduler.sampling_params import SamplingParams


def test_the_engine_process_matches_the_in_process_core(llm: LLM) -> None:
    prompts = random_prompts(6, 5, 60, seed=30)
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=1.0, max_tokens=8, seed=4, n=2, ignore_eos=True)] * 3
    expected = llm.generate(prompts, params)
    remote = make_llm(max_num_batched_tokens=256, kv_cache_memory=8 << 20, engine_process=True)
    try:
        assert remote.engine is None  # nothing of the core lives in this process
        results = remote.generate(prompts, params)
        stop = expected[0].outputs[0].text[2:5]
        stopped = remote.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, stop=[stop], ignore_eos=True))[0]
    finally:
        remote.shutdown()
    assert not remote.client.process.is_alive() and remote.client.process.exitcode == 0
    for got, want in zip(results, expected):
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
        assert [c.text for c in got.outputs] == [c.text for c in want.outputs]
        assert [c.finish_reason for c in got.outputs] == [c.finish_reason for c in want.outputs]
    # Requests reach the core process over a socket while it already steps, so its first batches may be cut
    # differently from the in-process core's, and fp32 kernels round differently at another batch size.
    got_logprobs, want_logprobs = results[0].outputs[0].logprobs, expected[0].outputs[0].logprobs
    assert [(e.token_id, [t for t, _ in e.top]) for e in got_logprobs] == \
        [(e.token_id, [t for t, _ in e.top]) for e in want_logprobs]
    assert [e.logprob for e in got_logprobs] == pytest.approx([e.logprob for e in want_logprobs], abs=1e-5)
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    full = expected[0].outputs[0].text
    assert stopped.outputs[0].text == full[: full.index(stop)]
    assert remote.stats_listener.requests and {r.finish_reason for r in remote.stats_listener.requests} >= {"stop"}
