"""Shared pieces of the GPU benchmarks: device facts, measured ceilings, the transformers baseline.

Every benchmark gives the Hugging Face side the same weights as ossrl's (built from ossrl's model,
experts dequantised exactly as transformers does offline) and records what it ran on.
"""

from __future__ import annotations

import datetime

import torch


def device_info() -> dict:
    import transformers

    info = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def copy_bandwidth_gbs(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus written (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del src, dst
    return 2 * nbytes / seconds / 1e9


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over reps (CUDA events), after `warmup` calls. Autograd as the
    caller has it (fn may run a backward)."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hf_from_ossrl(model, config, device="cuda", attn_implementation: str | None = None):
    """transformers' model with ossrl's weights (experts dequantised, transposed to [E, in, out])."""
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from ossrl.kernels.mxfp4 import dequantize_mxfp4

    hf_config = HFConfig.from_dict({k: v for k, v in config.to_hf_dict().items() if k != "quantization_config"})
    hf_config._attn_implementation = attn_implementation or ("flex_attention" if device == "cuda" else "eager")
    with torch.device("meta"):
        hf = GptOssForCausalLM(hf_config).to(model.dtype)  # cast on meta: never materialise fp32
    hf.to_empty(device=device)
    ours = {k: v for k, v in model.state_dict().items() if "lora" not in k}
    for name, dest in hf.state_dict().items():
        if name in ours:
            dest.copy_(ours[name])
        elif name.endswith(("gate_up_proj", "down_proj")):
            blocks, scales = ours[name + "_blocks"], ours[name + "_scales"]
            for e in range(blocks.shape[0]):
                dest[e].copy_(dequantize_mxfp4(blocks[e], scales[e], dest.dtype).T)
        elif "rotary" in name or "inv_freq" in name:
            continue
        else:
            raise KeyError(name)
    hf.model.rotary_emb = GptOssRotaryEmbedding(hf_config).to(device)  # non-persistent buffers: rebuild
    return hf




# Library switches a benchmark can set, each a module attribute: (flag, module, attribute, help).
# --flag / --no-flag override the library's default, which applies when neither is given;
# `apply_switches` returns the values in force, which the result JSON records.
SWITCHES = (
    ("fused-log-softmax", "ossrl.train.logprobs", "FUSED_LOG_SOFTMAX",
     "the chunked log-probs' softmax through ossrl.kernels.log_softmax (else PyTorch's ops)"),
    ("eager-logprob-grad", "ossrl.train.logprobs", "EAGER_GRADIENT",
     "the chunked log-probs' gradient for the hidden states computed in the forward (two lm_head matmuls "
     "a chunk, not three)"),
    ("fused-training-qkv", "ossrl.model.lora", "FUSED_TRAINING_QKV",
     "training forwards: q, k and v with their adapters from one base matmul, one A matmul and one "
     "block-diagonal B addmm"),
    ("sink-kernels", "ossrl.kernels.attention", "SINK_KERNELS",
     "the sinks' rescale through ossrl.kernels.sink_triton"),
    ("share-prefixes", "ossrl.engine.engine", "SHARE_PREFIXES",
     "rollouts: a prompt's n samples read its KV from one slot"),
    ("tile-experts", "ossrl.engine.engine", "TILE_EXPERTS",
     "rollouts: the MoE word decode reads tile-contiguous copies of the MXFP4 blocks"),
    ("defer-residual-add", "ossrl.model.gptoss", "DEFER_RESIDUAL_ADD",
     "rollouts: each layer's MLP output added to the residual stream by the next layer's norm kernel"),
    ("host-masks", "ossrl.engine.slots", "HOST_MASKS",
     "rollouts: prefill masks' block tables built on the host and copied once, else by kernels on the GPU"),
    ("flex-static", "ossrl.kernels.attention", "FLEX_STATIC",
     "FlexAttention compiled for each shape it meets (dynamic=False) in every self-attention call; "
     "--no-flex-static: torch's default (symbolic lengths from the second shape on) in every call; the "
     "library's default (\"training\") compiles static only under autograd (training passes)"),
    ("varlen-attention", "ossrl.kernels.attention", "VARLEN_ATTENTION",
     "self-attention over packed documents (shared prefixes too) through FlashAttention-2's varlen kernels"),
    ("training-lora-epilogue", "ossrl.kernels.moe_triton", "TRAINING_LORA_EPILOGUE",
     "training forwards: the expert LoRA B products in the MoE matmuls' epilogues (no [slots, out] deltas)"),
    ("fused-swiglu-backward", "ossrl.kernels.moe_triton", "FUSED_SWIGLU_BACKWARD",
     "training: the SwiGLU's backward and the down LoRA A path's input gradient in one kernel"),
    ("dw-in-swiglu-backward", "ossrl.kernels.moe_triton", "DW_IN_SWIGLU_BACKWARD",
     "with fused-swiglu-backward: the down backward's matmul without its epilogue; the routing weight and its "
     "gradient in the SwiGLU kernel"),
    ("down-lora-by-token", "ossrl.kernels.moe_triton", "DOWN_LORA_BY_TOKEN",
     "training: the down LoRA B side's t and dB from dout by token against all experts' B (no gathered [S, H])"),
    ("fused-residual-backward", "ossrl.model.gptoss", "FUSED_RESIDUAL_BACKWARD",
     "training: each residual add and the norm after it one autograd Function (the residual's gradient "
     "added in the norm's backward kernel)"),
    ("fused-lora-backward", "ossrl.model.lora", "FUSED_LORA_BACKWARD",
     "training: a LoRA linear's input gradient as one matmul plus one addmm into it (no add launch)"),
    ("rotary-append", "ossrl.model.gptoss", "ROTARY_APPEND",
     "rollout decode steps: rotary and the KV-cache append in one launch"),
    ("router-groups", "ossrl.kernels.fused", "ROUTER_GROUPS",
     "rollout decode steps: the router's top-k kernel also groups the slots by expert (no group_small launch)"),
    ("moe-gemv", "ossrl.kernels.moe_gemv", "GEMV",
     "MXFP4 experts at a token (GEMV_MAX_TOKENS) as CUDA-core matrix-vector products, not the 1-token tile"),
    ("combine-parts", "ossrl.kernels.moe_triton", "COMBINE_PARTS",
     "split-K down projections leave their partials to the k-sum (no second launch) where no LoRA term"),
    ("split-k-fixup", "ossrl.kernels.moe_triton", "SPLIT_K_FIXUP",
     "split-K MoE tiles: the last part to finish sums the partials and runs the epilogue, else a second "
     "launch (unset: each tile's TileConfig.fixup)"),
)


def add_switches(ap, names=None) -> None:
    """--NAME / --no-NAME for each switch (names: a subset), default the library's; the parser's
    args remember which (`apply_switches`)."""
    import argparse

    chosen = tuple(flag for flag, *_ in SWITCHES if names is None or flag in names)
    for flag, _, attribute, text in SWITCHES:
        if flag in chosen:
            ap.add_argument(f"--{flag}", dest=attribute.lower(), action=argparse.BooleanOptionalAction,
                            default=None, help=f"{text} ({attribute}; default: the library's)")
    ap.set_defaults(switches=chosen)


def apply_switches(args) -> dict:
    """Set the switches `add_switches` offered and the command line gave; {attribute in lower
    case: value in force} for each switch offered."""
    import importlib

    values = {}
    for flag, module_name, attribute, _ in SWITCHES:
        if flag not in args.switches:
            continue
        module = importlib.import_module(module_name)
        given = getattr(args, attribute.lower(), None)
        if given is not None:
            setattr(module, attribute, given)
        values[attribute.lower()] = getattr(module, attribute)
    return values
