"""The slot engine on CUDA: agreement with the simple path, graph replay, compaction, fused sampling."""

import pytest
import torch

from ossrl.engine.engine import RolloutEngine
from ossrl.engine.sampling import SamplingParams, sample_tokens
from ossrl.kernels.sampling import fold_seed, sample_temperature
from ossrl.testing import random_model, tiny_config

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

PROMPTS = [[5, 9, 33, 100, 7, 7, 81] * 3, [250, 1], list(range(3, 40))]


@pytest.fixture(scope="module")
def model32():
    config = tiny_config(num_hidden_layers=3, sliding_window=8, head_dim=16)
    return random_model(config, seed=21).cuda().eval()


def test_fused_sampler_matches_the_twin_rule():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 201088, device="cuda", generator=g) * 3
    seeds = torch.arange(64, device="cuda") + 1000
    steps = torch.arange(64, device="cuda") % 5
    for temperature in (0.0, 0.7, 1.0):
        a = sample_temperature(logits, temperature, fold_seed(seeds), steps)
        b = sample_tokens(logits.cpu(), SamplingParams(temperature=temperature, top_k=201088), seeds.cpu(), steps.cpu())
        agree = (a[0].cpu() == b[0]).float().mean().item()
        assert agree >= 0.98, (temperature, agree)  # fp32 vs fp64 noise: only near-ties may differ
        same = a[0].cpu() == b[0]
        torch.testing.assert_close(a[1].cpu()[same], b[1][same], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a[2].cpu()[same], b[2][same], rtol=1e-4, atol=1e-3)


def test_slot_engine_equals_simple_engine_in_fp32(model32):
    params = SamplingParams(temperature=1.0, max_new_tokens=[20, 33, 7], seed=3)
    simple = RolloutEngine(model32, backend="simple").generate(PROMPTS, n=4, params=params)
    slots = RolloutEngine(model32, backend="slots", cuda_graphs=False, sync_every=5).generate(PROMPTS, n=4, params=params)
    same = total = 0
    for ga, gb in zip(simple, slots):
        for a, b in zip(ga, gb):
            total += 1
            same += a.token_ids == b.token_ids
    assert same >= total - 1  # fp32 on different kernels: at most a rare near-tie differs


def test_cuda_graph_replay_equals_eager_steps():
    config = tiny_config(num_hidden_layers=2, sliding_window=8, quantization="mxfp4")
    model = random_model(config, seed=4, expert_format="mxfp4").cuda().to(torch.bfloat16).eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=[25, 9, 40], seed=7)
    eager = RolloutEngine(model, backend="slots", cuda_graphs=False, sync_every=4).generate(PROMPTS, n=3, params=params)
    engine = RolloutEngine(model, backend="slots", cuda_graphs=True, sync_every=4)
    graphed = engine.generate(PROMPTS, n=3, params=params)
    assert engine._slots.graphs and not engine._slots.graph_failures, engine._slots.graph_failures
    assert [[c.token_ids for c in g] for g in graphed] == [[c.token_ids for c in g] for g in eager]
    assert len(engine._slots.graphs) >= 2  # compaction moved to smaller buckets and replayed those too


def test_slot_engine_stops_and_compacts_on_gpu(model32):
    free = RolloutEngine(model32, backend="slots").generate([PROMPTS[0]], n=8, params=SamplingParams(max_new_tokens=40, seed=1))[0]
    stop = free[0].token_ids[6]
    params = SamplingParams(max_new_tokens=40, seed=1, stop_token_ids=[stop])
    got = RolloutEngine(model32, backend="slots").generate([PROMPTS[0]], n=8, params=params)[0]
    for a, b in zip(free, got):
        if stop in a.token_ids:
            assert b.token_ids == a.token_ids[: a.token_ids.index(stop) + 1] and b.finish_reason == "stop"
        else:
            assert b.token_ids == a.token_ids and b.finish_reason == "length"


def test_bf16_slot_engine_greedy_agrees_with_full_forward(model32):
    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=8), seed=4).cuda().to(torch.bfloat16).eval()
    out = RolloutEngine(model, backend="slots").generate([PROMPTS[2]], n=2, params=SamplingParams(temperature=0, max_new_tokens=16))[0]
    seq = PROMPTS[2] + out[0].token_ids
    with torch.no_grad():
        full = model(torch.tensor([seq], device="cuda"))[0, len(PROMPTS[2]) - 1:-1].float()
    chosen = full.gather(1, torch.tensor(out[0].token_ids, device="cuda")[:, None])[:, 0]
    # each greedy token is the full forward's argmax up to bf16 near-ties
    assert (chosen >= full.max(-1).values - 0.05).all()
    assert out[0].token_ids == out[1].token_ids


def test_captured_graphs_follow_the_adapter_switch():
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters

    config = tiny_config(num_hidden_layers=2, sliding_window=8, quantization="mxfp4")
    model = random_model(config, seed=4, expert_format="mxfp4").cuda().to(torch.bfloat16).eval()
    apply_lora(model, LoRAConfig(r=8))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    engine = RolloutEngine(model, backend="slots", cuda_graphs=True)
    adapted = engine.generate(PROMPTS, n=2, params=params)
    with model.adapters_disabled():
        base_same_engine = engine.generate(PROMPTS, n=2, params=params)
        base_fresh = RolloutEngine(model, backend="slots", cuda_graphs=False).generate(PROMPTS, n=2, params=params)
    tokens = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    assert tokens(base_same_engine) == tokens(base_fresh) != tokens(adapted)


def test_kept_graphs_sample_from_the_updated_adapter():
    """GRPO with enable_sleep_mode=False keeps the pool and graphs across steps while the optimizer
    changes the LoRA weights in place (and a resume loads them in place): the replayed graphs must
    sample what a fresh engine samples from the updated policy."""
    from ossrl.model.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_parameters, lora_state_dict
    from ossrl.train.optim import make_optimizer

    model = random_model(tiny_config(), seed=0, dtype=torch.bfloat16).cuda()
    apply_lora(model, LoRAConfig(r=8, seed=0))  # r=4: see the unaligned-rank test
    params = lora_parameters(model)
    optimizer = make_optimizer(params, lr=0.05)
    engine = RolloutEngine(model)
    prompts, params_s = [[1, 2, 3, 4, 5], [7, 8, 9]], SamplingParams(temperature=1.0, max_new_tokens=40, seed=3)

    def same(a, b):
        return [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]

    before = engine.generate(prompts, 4, params_s)
    graphs = {k: v[0] for k, v in engine._slots.graphs.items()}
    assert graphs and not engine._slots.graph_failures
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    after = engine.generate(prompts, 4, params_s)
    assert all(engine._slots.graphs.get(k, (None,))[0] is g for k, g in graphs.items())  # replayed, not re-captured
    assert not same(before, after)  # the update changed the policy
    assert same(after, RolloutEngine(model).generate(prompts, 4, params_s))
    load_lora_state_dict(model, {k: torch.randn_like(v) * 0.1 for k, v in lora_state_dict(model).items()})
    assert same(engine.generate(prompts, 4, params_s), RolloutEngine(model).generate(prompts, 4, params_s))


def test_graphs_recapture_after_another_engine_frees_the_rollout_copies():
    """Captured graphs read the adapters' rollout copies by address. Another engine's release()
    frees them; this engine's next generate must capture anew (not replay reads of freed memory,
    here refilled with NaN) and sample what it sampled before."""
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters

    model = random_model(tiny_config(), seed=2, dtype=torch.bfloat16).cuda()
    apply_lora(model, LoRAConfig(r=8, seed=0))  # r=4: see the unaligned-rank test
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
    prompts, params = [[1, 2, 3, 4, 5], [7, 8, 9]], SamplingParams(temperature=1.0, max_new_tokens=24, seed=5)
    tokens = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    engine, other = RolloutEngine(model), RolloutEngine(model)
    first = tokens(engine.generate(prompts, 4, params))
    graphs = {k: v[0] for k, v in engine._slots.graphs.items()}  # the objects: an id may be reused
    assert graphs
    other.generate(prompts, 4, params)
    other.release()
    torch.cuda.empty_cache()
    filler = torch.full((1 << 26,), float("nan"), device="cuda", dtype=torch.bfloat16)  # reuse freed blocks
    again = tokens(engine.generate(prompts, 4, params))
    del filler
    assert again == first
    assert not any(engine._slots.graphs.get(k, (None,))[0] is g for k, g in graphs.items())  # captured anew


def test_unaligned_lora_rank_decodes_in_cuda_graphs():
    """A rank whose bf16 rows are not 16-byte aligned (r=4), which torch._grouped_mm does not take
    as it is: decoding still captures in CUDA graphs (no path of its expert LoRA reads the offsets
    on the host, as the loop over experts would), with the tokens of eager decoding."""
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters

    model = random_model(tiny_config(), seed=0, dtype=torch.bfloat16).cuda()
    apply_lora(model, LoRAConfig(r=4, seed=0))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
    prompts, params = [[1, 2, 3, 4, 5], [7, 8, 9]], SamplingParams(temperature=1.0, max_new_tokens=24, seed=3)
    engine = RolloutEngine(model)
    graphed = engine.generate(prompts, 4, params)
    assert engine._slots.graphs and not engine._slots.graph_failures
    eager = RolloutEngine(model, cuda_graphs=False).generate(prompts, 4, params)
    assert [[c.token_ids for c in g] for g in graphed] == [[c.token_ids for c in g] for g in eager]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefixes_give_the_same_completions_in_cuda_graphs(dtype):
    """`share_prefixes` on CUDA (compiled decode kernel; graph replay in bf16, while fp32 experts
    run the PyTorch twin, which no graph captures): the n samples of a prompt
    read its KV from one slot on the full-attention layers; with every cache row poisoned (NaN)
    before the second generate (a row read from the wrong slot would show), tokens and log-probs
    equal the unshared engine's bit for bit (the same arithmetic on the same values), with one
    prompt per prefill forward and slots, leaders included, retiring on a stop token while their
    followers keep decoding from them."""
    config = tiny_config(num_hidden_layers=3, sliding_window=8, head_dim=64)
    model = random_model(config, seed=4, dtype=dtype).cuda().eval()
    free = RolloutEngine(model).generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=30, seed=5))
    params = SamplingParams(temperature=1.0, max_new_tokens=[30, 12, 25], seed=5,
                            stop_token_ids=[free[0][0].token_ids[3], free[2][0].token_ids[6]])
    options = dict(sync_every=2, prefill_tokens=16)
    plain = RolloutEngine(model, share_prefixes=False, **options).generate(PROMPTS, 4, params)
    assert any(group[0].finish_reason == "stop" for group in plain)  # a leader retires early
    engine = RolloutEngine(model, share_prefixes=True, **options)
    assert engine.generate(PROMPTS, 4, params) == plain
    if dtype == torch.bfloat16:  # fp32 experts run the PyTorch twin, whose bincount syncs: no graphs
        assert engine._slots.graphs and not engine._slots.graph_failures, engine._slots.graph_failures
    for cache in (*engine._slots.pool.k.values(), *engine._slots.pool.v.values()):
        cache.fill_(float("nan"))
    assert engine.generate(PROMPTS, 4, params) == plain


def test_tiled_expert_copies_give_the_same_rollouts_and_follow_the_blocks():
    """`tile_experts` (the slots backend's default): rollouts whose word decode reads the MXFP4
    blocks' tile-contiguous copies equal those reading the published blocks bit for bit, in CUDA
    graphs (hidden 192: gate_up rows of 24 words, three whole chunks of `TILED_LAYOUT`'s 8;
    intermediate 160: down rows of 20 words, two whole chunks and a ragged one; so the copies differ
    from the blocks); the kernels read the copies (the published blocks zeroed: the
    same output); the copies follow an in-place write to the blocks (same addresses: the graphs
    stay); `release` frees them; without memory to spare none are made."""
    import dataclasses

    from ossrl.kernels.moe import route
    from ossrl.kernels.moe_triton import choose_config, routed_experts_triton
    from ossrl.model.gptoss import Experts, inference_kernels, tile_experts

    config = tiny_config(num_hidden_layers=2, sliding_window=8, quantization="mxfp4", hidden_size=192,
                         intermediate_size=160)
    model = random_model(config, seed=4, expert_format="mxfp4").cuda().to(torch.bfloat16).eval()
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    params = SamplingParams(temperature=1.0, max_new_tokens=[25, 9, 40], seed=7)
    plain_engine = RolloutEngine(model, tile_experts=False, sync_every=4)
    plain = plain_engine.generate(PROMPTS, 3, params)
    first = experts[0].gate_up_proj_blocks[0].clone()
    with torch.no_grad():
        experts[0].gate_up_proj_blocks[0] = experts[0].gate_up_proj_blocks[1]
    changed = plain_engine.generate(PROMPTS, 3, params)
    assert changed != plain
    with torch.no_grad():
        experts[0].gate_up_proj_blocks[0] = first
    assert all(m.tiled is None for m in experts)
    engine = RolloutEngine(model, tile_experts=True, sync_every=4)
    assert engine.generate(PROMPTS, 3, params) == plain
    assert engine._slots.graphs and not engine._slots.graph_failures, engine._slots.graph_failures
    assert all(m.tiled is not None for m in experts)
    assert not torch.equal(experts[0].tiled["gate_up"], experts[0].gate_up_proj_blocks)
    with inference_kernels():
        ew = experts[0].expert_weights()
        assert ew.gate_up_tiled is experts[0].tiled["gate_up"]
        g = torch.Generator(device="cuda").manual_seed(0)
        for tokens in (1, 8):
            x = torch.randn(tokens, 192, device="cuda", generator=g).bfloat16()
            w, ids = route(torch.randn(tokens, 4, device="cuda", generator=g), 2)
            cfg = choose_config(tokens * 2, ew)
            zeroed = dataclasses.replace(ew, gate_up=torch.zeros_like(ew.gate_up), down=torch.zeros_like(ew.down))
            published = dataclasses.replace(ew, gate_up_tiled=None, down_tiled=None, tiled=None)
            assert cfg.words and cfg.split_k == 2
            assert torch.equal(routed_experts_triton(x, w, ids, zeroed, config=cfg),
                               routed_experts_triton(x, w, ids, published, config=cfg))
    assert experts[0].expert_weights().gate_up_tiled is None  # training forwards read the published blocks
    copies = [m.tiled["gate_up"].data_ptr() for m in experts]
    graphs = {k: v[0] for k, v in engine._slots.graphs.items()}
    with torch.no_grad():
        experts[0].gate_up_proj_blocks[0] = experts[0].gate_up_proj_blocks[1]
    assert engine.generate(PROMPTS, 3, params) == changed
    assert [m.tiled["gate_up"].data_ptr() for m in experts] == copies
    assert all(engine._slots.graphs.get(k, (None,))[0] is g for k, g in graphs.items())  # kept, not captured again
    engine.release()
    assert all(m.tiled is None for m in experts)
    assert tile_experts(model, reserve_bytes=1 << 50) == 0 and all(m.tiled is None for m in experts)


def _rollouts_switched(monkeypatch, module, switch: str, check) -> None:
    """Rollouts (tiny 20b-like model, MXFP4 experts, head_dim 64, CUDA graphs) with `module.switch`
    off, then on: graphs captured without failures, `check(on)` after each, the same completions
    bit for bit."""
    config = tiny_config(num_hidden_layers=2, sliding_window=8, quantization="mxfp4", head_dim=64)
    model = random_model(config, seed=6, expert_format="mxfp4").cuda().to(torch.bfloat16).eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=[25, 9, 40], seed=3)
    runs = []
    for on in (False, True):
        monkeypatch.setattr(module, switch, on)
        engine = RolloutEngine(model, sync_every=4)
        runs.append(engine.generate(PROMPTS, 3, params))
        assert engine._slots.graphs and not engine._slots.graph_failures, engine._slots.graph_failures
        check(on)
    assert runs[0] == runs[1]


def test_router_groups_give_the_same_rollouts_in_cuda_graphs(monkeypatch):
    """fused.ROUTER_GROUPS (the router's top-k kernel grouping the slots, one program, a barrier
    between its stores and the grouping's loads): the same completions bit for bit as group_small,
    with graphs captured and replayed; the grouping kernel ran and group_small did not at decode."""
    from ossrl.kernels import fused, moe_triton

    calls = []
    grouped, small = fused.router_topk_grouped, moe_triton.group_small
    monkeypatch.setattr(fused, "router_topk_grouped", lambda *a: calls.append("grouped") or grouped(*a))
    monkeypatch.setattr(moe_triton, "group_small", lambda *a: calls.append("small") or small(*a))

    def check(on):
        # (the prompts pack to 60 tokens, so their prefill's routers group too: no group_small at all)
        assert ("grouped" in calls) == on and ("small" in calls) == (not on)
        calls.clear()

    _rollouts_switched(monkeypatch, fused, "ROUTER_GROUPS", check)


def test_rotary_append_gives_the_same_rollouts_in_cuda_graphs(monkeypatch):
    """gptoss.ROTARY_APPEND (a decode step's rotary and KV append in one launch): the same
    completions bit for bit as the two launches, with graphs captured and replayed."""
    from ossrl.kernels import fused
    from ossrl.model import gptoss

    calls = []
    kernel = fused.rotary_append
    monkeypatch.setattr(fused, "rotary_append", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))

    def check(on):  # the fused launch ran (in the captured steps) only with the switch on
        assert bool(calls) == on

    _rollouts_switched(monkeypatch, gptoss, "ROTARY_APPEND", check)
