"""AdamW with its states in CPU memory (ossrl.train.offloaded_adamw): torch.optim.AdamW's numbers,
its state-dict format, and the training loop's schedule and loss-scaling glue around it (CPU)."""

import io
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


def step_each(steps, *runs):
    """For each step: gradients, then a step, for every (params, optimizer) run."""
    for step in steps:
        for params, opt in runs:
            set_grads(params, step)
            opt.step()


def copy_values(dst, src):
    with torch.no_grad():
        for p, q in zip(dst, src):
            p.copy_(q)


def test_state_dicts_move_between_offloaded_and_plain_adamw_mid_run():
    reference, ours, theirs = make_params(), make_params(), make_params()
    ref = torch.optim.AdamW(groups_of(reference), weight_decay=0.05, foreach=True)
    plain = torch.optim.AdamW(groups_of(theirs), weight_decay=0.05, foreach=True)
    step_each(range(2), (reference, ref), (theirs, plain))
    # plain -> offloaded: the states land in the host buffers, the hyperparameters in the groups
    copy_values(ours, theirs)
    offloaded = OffloadedAdamW(groups_of(ours), weight_decay=0.05, chunk_numel=30)
    offloaded.load_state_dict(plain.state_dict())
    assert offloaded.param_groups[1]["betas"] == (0.8, 0.99)
    step_each(range(2, 4), (reference, ref), (ours, offloaded))
    # offloaded -> plain, through a checkpoint's path (load_optimizer_state)
    copy_values(theirs, ours)
    plain = torch.optim.AdamW(groups_of(theirs), weight_decay=0.05, foreach=True)
    load_optimizer_state(plain, offloaded.state_dict())
    step_each([4], (reference, ref), (theirs, plain))
    for p, q in zip(reference, theirs):
        assert torch.equal(p, q)


def test_loading_a_state_less_dict_resets_and_a_mismatched_one_changes_nothing():
    params = make_params()
    opt = OffloadedAdamW(params, lr=0.1)
    set_grads(params, 0)
    opt.step()
    opt.load_state_dict(torch.optim.AdamW(make_params(), lr=0.2).state_dict())  # no step yet: no states
    assert opt.param_groups[0]["lr"] == 0.2
    assert all(opt.state[p]["step"].item() == 0 and not opt.state[p]["exp_avg"].any() for p in params)
    set_grads(params, 1)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    other = torch.optim.AdamW(make_params()[:4], lr=0.1)
    with pytest.raises(ValueError, match=r"groups of \[4\] parameters, this optimizer \[5\]"):
        opt.load_state_dict(other.state_dict())
    swapped = make_params()
    swapped[0], swapped[4] = swapped[4], swapped[0]
    wrong = torch.optim.AdamW(swapped, lr=0.3)
    set_grads(swapped, 0)
    wrong.step()
    with pytest.raises(ValueError, match=r"optimizer state 0.exp_avg: shape \(33, 2\), its parameter \(7, 3\)"):
        opt.load_state_dict(wrong.state_dict())
    sgd = torch.optim.SGD(make_params(), lr=0.1, momentum=0.9)
    set_grads(sgd.param_groups[0]["params"], 0)
    sgd.step()
    with pytest.raises(ValueError, match=r"optimizer state 0: no \['exp_avg', 'exp_avg_sq', 'step'\]"):
        opt.load_state_dict(sgd.state_dict())
    # nothing changed by the refused loads
    assert opt.param_groups[0]["lr"] == 0.2
    assert all(torch.equal(before[k], v) for k, v in opt.state[params[0]].items())


def test_settings_it_does_not_implement_are_refused_not_ignored():
    with pytest.raises(ValueError, match="amsgrad=True; only amsgrad=False"):
        OffloadedAdamW([{"params": make_params(), "amsgrad": True}])
    opt = OffloadedAdamW(make_params())
    for bad, match in ((torch.optim.Adam(make_params()), "decoupled_weight_decay=False"),
                       (torch.optim.AdamW(make_params(), maximize=True), "maximize=True")):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad.state_dict())
    with pytest.raises(RuntimeError, match="pass every parameter group to the constructor"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="floating point on one device"):
        OffloadedAdamW([torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="chunk_numel must be positive"):
        OffloadedAdamW(make_params(), chunk_numel=0)


def test_a_tensor_learning_rate_works_as_in_adamw():
    ours, theirs = make_params(), make_params()
    a = OffloadedAdamW(ours, lr=torch.tensor(0.01))
    b = torch.optim.AdamW(theirs, lr=0.01, foreach=True)
    for step in range(2):
        set_grads(ours, step)
        set_grads(theirs, step)
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_a_checkpoint_of_offloaded_states_resumes_a_fused_adamw_as_fused():
    ours, theirs = make_params(), make_params()
    a = OffloadedAdamW(ours, lr=0.01)
    step_each([0], (ours, a))
    fused = torch.optim.AdamW(theirs, lr=0.01, fused=True)
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)  # as a checkpoint: the loaded tensors are not the host buffers
    saved.seek(0)
    load_optimizer_state(fused, torch.load(saved))
    assert fused.param_groups[0]["fused"] is True
    copy_values(theirs, ours)
    step_each([1], (ours, a), (theirs, fused))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # the fused kernel rounds a little apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["unscaled", "fp16-loss-scaled"])
def test_schedule_and_loss_scaler_drive_it_like_adamw(dtype):
    """The training loop's optimizer_step: schedule, clipping and (fp16 mode) the loss scaler,
    whose overflow step (an inf gradient at step 2) skips the update for both alike."""
    ours, theirs = make_params(), make_params()
    runs = []
    for params, offload in ((ours, True), (theirs, False)):
        optimizer = make_optimizer(params, lr=0.05, weight_decay=0.01, offload=offload)
        assert isinstance(optimizer, OffloadedAdamW) == offload
        scheduler = make_scheduler(optimizer, kind="cosine", warmup_steps=1, total_steps=4)
        scaler = make_loss_scaler(SimpleNamespace(device=torch.device("cpu"), dtype=dtype))
        assert scaler.is_enabled() == (dtype == torch.float16)
        lrs, skipped = [], []
        for step in range(4):
            scaler.scale(torch.ones(()))  # as a loss would be: the scale exists from here on
            set_grads(params, step)
            if step == 2:
                params[1].grad[0] = float("inf")
            update = optimizer_step(optimizer, scheduler, scaler, params, max_grad_norm=1.0)
            lrs.append(optimizer.param_groups[0]["lr"])
            skipped.append(update.get("overflow", 0))
        runs.append((lrs, skipped))
    assert runs[0] == runs[1]
    assert runs[0][1] == ([0, 0, 1, 0] if dtype == torch.float16 else [0, 0, 0, 0])
    for p, q in zip(ours, theirs):
        if dtype == torch.float16 or p is not ours[1]:  # unscaled, the inf reaches parameter 1 (NaN)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # torch's CPU default: the for-loop AdamW
