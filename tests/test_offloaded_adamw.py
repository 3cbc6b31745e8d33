"""AdamW with its states in CPU memory (ossrl.train.offloaded_adamw): torch.optim.AdamW's numbers,
its state-dict format, and the training loop's schedule and loss-scaling glue around it (CPU)."""

from types import SimpleNamespace

import pytest
import torch

from ossrl.train.offloaded_adamw import OffloadedAdamW
from ossrl.train.optim import make_loss_scaler, make_optimizer, make_scheduler, optimizer_step
from ossrl.train.sharding import load_optimizer_state


def make_params(seed=0, dtypes=(torch.float32,) * 5):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (11,), (4, 5, 2), (1,), (33, 2)]
    return [torch.randn(s, generator=g).to(d).requires_grad_() for s, d in zip(shapes, dtypes)]


def groups_of(params, lr=1e-2):
    # two groups with their own hyperparameters, as a caller may pass
    return [{"params": params[:3], "lr": lr, "weight_decay": 0.1},
            {"params": params[3:], "lr": lr / 3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]


def set_grads(params, step, skip=()):
    for i, p in enumerate(params):
        if i in skip:
            p.grad = None  # a parameter without a gradient this step is left alone, states and all
        else:
            g = torch.Generator().manual_seed(1000 * step + i)
            p.grad = (torch.randn(p.shape, generator=g) * (1 + i)).to(p.dtype)


@pytest.mark.parametrize("chunk_numel", [2**25, 40, 1], ids=["one-chunk", "several-chunks", "one-param-per-chunk"])
@pytest.mark.parametrize("foreach", [True, False])
def test_steps_equal_torch_adamw_bit_for_bit(chunk_numel, foreach):
    ours, theirs = make_params(), make_params()
    a = OffloadedAdamW(groups_of(ours), lr=1e-2, eps=1e-6, weight_decay=0.05, chunk_numel=chunk_numel)
    b = torch.optim.AdamW(groups_of(theirs), lr=1e-2, eps=1e-6, weight_decay=0.05, foreach=foreach)
    for step in range(6):
        skip = (1,) if step in (2, 3) else ()
        set_grads(ours, step, skip)
        set_grads(theirs, step, skip)
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), (step, p - q)
    for p, q in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.state[p][key], b.state[q][key]), key
    assert a.state[ours[1]]["step"].item() == 4  # skipped twice


def test_bf16_parameters_keep_bf16_states_like_adamw():
    dtypes = (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)
    ours, theirs = make_params(1, dtypes), make_params(1, dtypes)
    a = OffloadedAdamW(ours, lr=1e-3, chunk_numel=16)
    b = torch.optim.AdamW(theirs, lr=1e-3, foreach=True)
    for step in range(3):
        set_grads(ours, step)
        set_grads(theirs, step)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert a.state[p]["exp_avg"].dtype == p.dtype and torch.equal(p, q)


def test_state_dicts_move_between_offloaded_and_plain_adamw_mid_run():
    reference, ours, theirs = make_params(), make_params(), make_params()
    ref = torch.optim.AdamW(groups_of(reference), weight_decay=0.05, foreach=True)
    plain = torch.optim.AdamW(groups_of(theirs), weight_decay=0.05, foreach=True)
    for step in range(2):
        for params, opt in ((reference, ref), (theirs, plain)):
            set_grads(params, step)
            opt.step()
    # plain -> offloaded: the states land in the host buffers, the hyperparameters in the groups
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    offloaded = OffloadedAdamW(groups_of(ours), weight_decay=0.05, chunk_numel=30)
    offloaded.load_state_dict(plain.state_dict())
    assert offloaded.param_groups[1]["betas"] == (0.8, 0.99)
    for step in range(2, 4):
        for params, opt in ((reference, ref), (ours, offloaded)):
            set_grads(params, step)
            opt.step()
    # offloaded -> plain, through a checkpoint's path (load_optimizer_state)
    with torch.no_grad():
        for p, q in zip(theirs, ours):
            p.copy_(q)
    plain = torch.optim.AdamW(groups_of(theirs), weight_decay=0.05, foreach=True)
    load_optimizer_state(plain, offloaded.state_dict())
    set_grads(reference, 4)
    ref.step()
    set_grads(theirs, 4)
    plain.step()
    for p, q in zip(reference, theirs):
        assert torch.equal(p, q)


def test_a_fresh_offloaded_state_dict_loads_and_a_mismatched_one_is_refused():
    params = make_params()
    fresh = OffloadedAdamW(params, lr=0.1)
    fresh.load_state_dict(torch.optim.AdamW(make_params(), lr=0.1).state_dict())  # no step yet: no states
    assert all(fresh.state[p]["step"].item() == 0 and not fresh.state[p]["exp_avg"].any() for p in params)
    other = torch.optim.AdamW(make_params()[:4], lr=0.1)
    with pytest.raises(ValueError, match=r"groups of \[4\] parameters, this optimizer \[5\]"):
        fresh.load_state_dict(other.state_dict())
    swapped = make_params()
    swapped[0], swapped[4] = swapped[4], swapped[0]
    wrong = torch.optim.AdamW(swapped)
    set_grads(swapped, 0)
    wrong.step()
    with pytest.raises(ValueError, match=r"optimizer state 0.exp_avg: shape \(33, 2\), its parameter \(7, 3\)"):
        fresh.load_state_dict(wrong.state_dict())


def test_schedule_and_loss_scaler_drive_it_like_adamw():
    ours, theirs = make_params(), make_params()
    runs = []
    for params, offload in ((ours, True), (theirs, False)):
        optimizer = make_optimizer(params, lr=0.05, weight_decay=0.01, offload=offload)
        assert isinstance(optimizer, OffloadedAdamW) == offload
        scheduler = make_scheduler(optimizer, kind="cosine", warmup_steps=1, total_steps=4)
        scaler = make_loss_scaler(SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32))
        lrs = []
        for step in range(4):
            set_grads(params, step)
            optimizer_step(optimizer, scheduler, scaler, params, max_grad_norm=1.0)
            lrs.append(optimizer.param_groups[0]["lr"])
        runs.append(lrs)
    assert runs[0] == runs[1]
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # torch's CPU default is the for-loop AdamW


def test_bad_parameters_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="floating point on one device"):
        OffloadedAdamW([torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="chunk_numel must be positive"):
        OffloadedAdamW(make_params(), chunk_numel=0)
