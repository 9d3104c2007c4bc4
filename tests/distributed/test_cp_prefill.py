"""A generation prefill under context parallelism (parallel/context_prefill.py) gives the
cache and next-token logits of one process's prefill, and the same greedy tokens.

Gloo ranks, the suite's tiny models (tests/distributed/equivalence.py), prompts whose
length is no multiple of 2 x cp (so the padding runs): every rank compares each cache
tensor and the last position's logits with one process's prefill of the same prompt
(within 1e-5) and 8 greedily decoded tokens after the CP prefill with one process's.

* CP2 (one spawn): dense GQA (4 query / 2 KV heads, ring attention); YOCO sliding window
  (W = 5 over 13 tokens: the window [9, 13) crosses the border of chunks 2 and 3, held by
  different ranks); YOCO gated retention (retention chunk 3, the state scanned over 4
  chunks, 2 padding positions); DHA (per-layer key/value heads, all-gather attention);
  dropless MoE (the suite's sigmoid router with a shared expert).
* CP4: YOCO retention (19 tokens in 8 chunks of 3, 7 scanned states, 5 padding positions).
* Faults: with the second chunk of every gathered key/value dropped (``TEST_FAULTS``) the
  dense and YOCO caches differ; with the retention state scan skipped (``SCAN_STATES``)
  the retention state and the logits differ.
"""
from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

from tests.distributed.equivalence import model_config
from tests.distributed.harness import Call, run_batch
from tests.distributed.layouts_dha import DHA
from tests.distributed.layouts_moe_cp import MOE_CP

NEW_TOKENS = 8
TOL = 1e-5

SWA5 = {"arch": "yoco", "yoco": {"self_decoder": "swa", "sliding_window": 5}}
RETENTION3 = {"arch": "yoco", "yoco": {"self_decoder": "retention", "retention_chunk": 3}}

#: name -> (model overrides, prompt length, CP attention kind)
CP2_CASES: dict[str, tuple[dict, int, str]] = {
    "dense_gqa": ({}, 13, "ring"),
    "yoco_swa": (SWA5, 13, "ring"),
    "yoco_retention": (RETENTION3, 14, "ring"),
    "dha": (DHA, 11, "allgather"),
    "moe": (MOE_CP, 10, "ring"),
}
#: prompts at the ends of the range (one new token): a one-token prompt (7 padding positions,
#: the window holds one key); 29 of max_seq_len=30 (padded to 32: positions past the RoPE
#: table reuse its last angle)
EDGE_CASES: dict[str, tuple[dict, int, str]] = {
    "swa_one_token": (SWA5, 1, "ring"),
    "dense_past_rope_table": ({"max_seq_len": 30}, 29, "allgather"),
}


def cache_tensors(cache) -> dict[str, torch.Tensor]:
    """Every tensor a cache holds, by name (DenseKVCache or YOCOCache)."""
    if hasattr(cache, "shared_k"):
        out = {"shared_k": cache.shared_k, "shared_v": cache.shared_v}
        out.update({f"window{i}.{j}": t for i, pair in cache.windows.items() for j, t in enumerate(pair)})
        out.update({f"state{i}": s for i, s in cache.states.items()})
        return out
    return {f"{kind}{i}": t for kind, d in (("k", cache.keys), ("v", cache.values)) for i, t in d.items()}


def _prefill_against_one_process(model_kw: dict, prompt_len: int, kind: str, fault: Optional[str] = None,
                                 new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Every rank: one process's prefill and the CP prefill of the same prompt (B=2); the
    largest difference per cache tensor and of the logits, and both greedy continuations."""
    from polytron.model.generate import generate
    from polytron.model.transformer import build_model
    from polytron.model.yoco import context_parallel as cpm
    from polytron.parallel import context_prefill as cpp
    cfg = model_config(**model_kw)
    model = build_model(cfg, seed=11).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(5))
    max_len = prompt_len + new_tokens
    one = model.spec.make_cache(cfg, 2, max_len, None, torch.float32)
    with torch.no_grad():
        want = model(prompt, cache=one, start=0)[:, -1]                  # (B, V)
    one.advance(prompt_len)
    if fault == "drop_chunk":
        cpp.TEST_FAULTS.add(fault)
    cpm.SCAN_STATES = fault != "no_scan"
    try:
        mine = model.spec.make_cache(cfg, 2, max_len, None, torch.float32)
        got = cpp.cp_prefill(model, prompt, mine, dist.group.WORLD, kind)
        mine.advance(prompt_len)
        tokens = generate(model, prompt, new_tokens, prefill=cpp.context_parallel_prefill(dist.group.WORLD, kind))
    finally:
        cpp.TEST_FAULTS.discard("drop_chunk")
        cpm.SCAN_STATES = True
    ref = generate(model, prompt, new_tokens)
    theirs = cache_tensors(one)
    diffs = {name: float((t - theirs[name]).abs().max()) for name, t in cache_tensors(mine).items()}
    return {"logits": float((got - want).abs().max()), "cache": diffs, "length": mine.length,
            "tokens": tokens.tolist(), "ref_tokens": ref.tolist()}


@pytest.fixture(scope="module")
def cp2():
    calls = [Call(name, _prefill_against_one_process, case, budget_s=90) for name, case in CP2_CASES.items()]
    calls += [Call("dense_drop_chunk", _prefill_against_one_process, (*CP2_CASES["dense_gqa"], "drop_chunk"), 90),
              Call("swa_drop_chunk", _prefill_against_one_process, (*CP2_CASES["yoco_swa"], "drop_chunk"), 90),
              Call("retention_no_scan", _prefill_against_one_process, (*CP2_CASES["yoco_retention"], "no_scan"), 90)]
    calls += [Call(name, _prefill_against_one_process, (*case, None, 1), 90) for name, case in EDGE_CASES.items()]
    return run_batch(calls, 2, base_s=60)


def assert_equal_prefill(ranks: list[dict], prompt_len: int, new_tokens: int = NEW_TOKENS) -> None:
    for res in ranks:
        assert res["logits"] <= TOL, res
        assert max(res["cache"].values()) <= TOL, res["cache"]
        assert res["length"] == prompt_len
        assert res["tokens"] == res["ref_tokens"], res
        assert len(res["tokens"][0]) == prompt_len + new_tokens
    assert all(r["tokens"] == ranks[0]["tokens"] for r in ranks), "every rank decodes the same tokens"


@pytest.mark.parametrize("name", list(CP2_CASES))
def test_cp2_prefill_equals_one_process(cp2, name):
    assert_equal_prefill(cp2.get(name), CP2_CASES[name][1])


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_cp2_prefill_edge_lengths(cp2, name):
    assert_equal_prefill(cp2.get(name), EDGE_CASES[name][1], new_tokens=1)


def test_cp4_retention_prefill_equals_one_process():
    case = (RETENTION3, 19, "ring")
    batch = run_batch([Call("retention_cp4", _prefill_against_one_process, case, budget_s=120)], 4, base_s=90)
    assert_equal_prefill(batch.get("retention_cp4"), 19)


def test_dropped_chunk_is_caught(cp2):
    for res in cp2.get("dense_drop_chunk"):
        assert max(res["cache"].values()) > 1e-2, res["cache"]
    for res in cp2.get("swa_drop_chunk"):
        assert max(res["cache"][n] for n in ("shared_k", "shared_v")) > 1e-2, res["cache"]


def test_skipped_state_scan_is_caught(cp2):
    for res in cp2.get("retention_no_scan"):
        assert max(v for n, v in res["cache"].items() if n.startswith("state")) > 1e-3, res["cache"]
        assert res["logits"] > 1e-3, res


# ---------------------------------------------------------------- one process: layout and refusals

def test_padded_length():
    from polytron.parallel.context_prefill import padded_length
    assert padded_length(16, 2) == 16 and padded_length(13, 2) == 16 and padded_length(1, 4) == 8
    assert padded_length(13, 2, halo=8) == 32          # chunks at least as long as the window's halo


@pytest.mark.parametrize("model_kw,cache_kind,kind,needle", [
    ({}, "none", "ring", "no cache cannot be filled that way"),
    ({}, "used", "ring", "empty cache, not one holding 3 positions"),
    ({}, "fresh", "bogus", "attention kind 'bogus'"),
    ({"arch": "moe", "moe": {"capacity_factor": 1.0}}, "fresh", "ring", "model.moe.capacity_factor=1.0"),
])
def test_refusals_are_one_line(model_kw, cache_kind, kind, needle):
    from polytron.model.generate import GenerationError
    from polytron.model.transformer import build_model
    from polytron.parallel.context_prefill import check_prefill
    cfg = model_config(**model_kw)
    model = build_model(cfg)
    cache = None if cache_kind == "none" else model.spec.make_cache(cfg, 1, 16, None, torch.float32)
    if cache_kind == "used":
        cache.advance(3)
    with pytest.raises(GenerationError) as err:
        check_prefill(model, cache, 2, kind)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- tools/generate.py --context-parallel

PROMPT = "The function returns a value"


@pytest.fixture(scope="module")
def yoco_run(tmp_path_factory) -> str:
    """A tiny YOCO (retention self-decoder) trained for one iteration by launch/pretrain.py."""
    from tests.checkpoint import runs
    out = str(tmp_path_factory.mktemp("cp_gen") / "run")
    assert runs.run(out, 1, "model.arch=yoco", "model.yoco.self_decoder=retention") == 0, runs.output(out)[-3000:]
    return out


def _tool_on_rank(argv: list[str]) -> tuple[int, str, str]:
    """tools/generate.py's main on this rank (the process group exists): (status, stdout, stderr)."""
    import contextlib
    import io

    from polytron.tools.generate import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_tool_context_parallel_prints_the_one_process_text(yoco_run, capsys):
    from polytron.tools.generate import main
    from tests.distributed.harness import run_distributed
    argv = [yoco_run, "--prompt", PROMPT, "--max-new-tokens", "10"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert want.startswith(PROMPT) and len(want) > len(PROMPT) + 1
    ranks = run_distributed(_tool_on_rank, 2, [*argv, "--context-parallel", "2"], timeout=120)
    assert ranks == [(0, want, ""), (0, "", "")]                         # rank 0 prints


@pytest.mark.parametrize("extra,needle", [
    (["--context-parallel", "2"], "--context-parallel 2 runs under torchrun --nproc-per-node 2"),
    (["--context-parallel", "0"], "--context-parallel 0: must be >= 1"),
    (["--context-parallel", "2", "--no-cache"], "cannot run with --no-cache"),
])
def test_tool_context_parallel_errors_are_one_line(extra, needle, capsys, tmp_path, monkeypatch):
    from polytron.tools.generate import main
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([str(tmp_path), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
