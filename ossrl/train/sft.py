"""Supervised fine-tuning on harmony conversations: loss on assistant tokens only.

    ossrl sft examples/sft-tiny.toml [key=value ...]

Data is JSON lines, one conversation per line: {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "thinking": ..., "content": ...}]}. Each conversation is rendered with the
harmony format (`render_training`), sequences are packed into rows of `max_length` tokens, and
the loss is the mean negative log-prob of the trained (assistant) tokens, computed in chunks.
LoRA by default; `full_finetune = true` trains every weight (small models, e.g. the demo's).

Under torchrun each rank trains its share of every step's micro-batches (ossrl.train.distributed:
N ranks with gradient_accumulation_steps A train like one process with N*A micro-batches), and
`fsdp = true` shards the model's layers over the ranks (ossrl.train.sharding; LoRA only).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ossrl.configs import dumps_toml, load_config, to_dict
from ossrl.model.lora import LoRAConfig, apply_lora, format_trainable_counts, lora_parameters, lora_state_dict
from ossrl.train.checkpoint import atomic_directory, save_adapter
from ossrl.train.distributed import init_distributed, micro_batch_rng
from ossrl.train.graphed import CapturedLogprobs
from ossrl.train.logprobs import pack_sequences, sequence_logprobs
from ossrl.train.memory import configure_memory, with_checkpointing_fallback
from ossrl.train.optim import SCHEDULES, make_loss_scaler, make_optimizer, make_scheduler, optimizer_step
from ossrl.train.sharding import shard_model, sharding_summary


@dataclass
class SFTConfig:
    model: str = ""
    data: str = ""
    output_dir: str = "runs/sft"
    full_finetune: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_train_epochs: int = 1
    max_steps: int = -1  # > 0 overrides num_train_epochs
    max_length: int = 2048  # tokens per packed row; longer conversations are truncated
    per_device_train_batch_size: int = 8  # conversations per micro-batch
    gradient_accumulation_steps: int = 1
    reasoning_effort: str = "medium"
    # true: recompute every layer in backward; "auto": only the layers whose activations do not fit
    # in free memory (measured each step); false: keep all activations
    gradient_checkpointing: bool | str = "auto"
    activation_budget_gb: float | None = None  # "auto": GiB for kept activations (default: measured)
    offload_activations: bool = False
    offload_embeddings: bool = False
    offload_optimizer: bool = False  # AdamW's states in pinned CPU memory, streamed through the GPU per step
    # GiB of bf16 copies of the frozen MXFP4 experts (layers in order), read by training-sized MoE
    # calls instead of a decode per call (ossrl.train.memory); 0: none
    dense_experts_gb: float = 0.0
    # CUDA: each micro-batch shape up to 4,096 tokens (rows times length, padded to multiples of
    # 1,024 so that shapes repeat) has its forward and backward captured in CUDA graphs the second
    # time it comes, then replayed (ossrl.train.graphed: GRPOConfig.capture_training says more).
    capture_training: bool = False
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; float16: GPUs without bf16 (loss scaling on)
    logging_steps: int = 10
    save_steps: int = 0
    seed: int = 42
    fsdp: bool = False  # under torchrun: shard the layers over the ranks (LoRA only)

    def __post_init__(self):
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            raise ValueError(f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        for name in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.dense_experts_gb >= 0:
            raise ValueError(f"dense_experts_gb must be >= 0, got {self.dense_experts_gb}")
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be auto, bfloat16, float32 or float16, got {self.dtype!r}")
        if self.reasoning_effort not in ("low", "medium", "high"):
            raise ValueError(f"reasoning_effort must be low, medium or high, got {self.reasoning_effort!r}")
        if self.fsdp and (self.full_finetune or self.dtype == "float16" or self.activation_budget_gb is not None
                          or self.offload_optimizer or self.dense_experts_gb):
            raise ValueError("fsdp trains LoRA adapters in bfloat16 or float32 with every layer checkpointed the "
                             "same way on every rank, its optimizer states and experts sharded: it excludes "
                             "full_finetune, dtype float16, activation_budget_gb, offload_optimizer and "
                             "dense_experts_gb")
        if self.full_finetune and self.dtype == "float16":
            raise ValueError("full_finetune with dtype float16 is not supported: the weights would be fp16 "
                             "AdamW masters, whose small updates and optimizer state underflow. Train LoRA "
                             "adapters (fp32 masters) or use dtype bfloat16 / float32")


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def read_conversations(path: str | Path) -> list[list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SFT data file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{n}: expected an object with a non-empty 'messages' list")
        rows.append(messages)
    if not rows:
        raise ValueError(f"{path}: no conversations")
    return rows


def tokenize_conversations(tokenizer, conversations, *, reasoning_effort: str, max_length: int):
    from ossrl.model.chat import render_training

    sequences, masks, dropped = [], [], 0
    for messages in conversations:
        ids, mask = render_training(tokenizer, messages, reasoning_effort=reasoning_effort)
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            dropped += 1
            continue
        sequences.append(ids)
        masks.append(mask)
    return sequences, masks, dropped


def train_sft(config: SFTConfig, *, log=print) -> Path:
    """Run SFT; returns the final checkpoint directory (an adapter, or a full model)."""
    from ossrl.model.loading import load_model, resolve_checkpoint, save_model
    from ossrl.model.tokenizer import load_tokenizer

    ctx = init_distributed()
    if config.fsdp and not ctx.enabled:
        raise ValueError("fsdp = true needs several processes: torchrun --nproc-per-node N ossrl sft ...")
    log = log if ctx.is_main else (lambda *_: None)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)  # the same data order on every rank: each takes its share
    device = config.device
    if device == "auto" and ctx.enabled and torch.cuda.is_available():
        device = f"cuda:{ctx.local_rank}"
    device, dtype = resolve_device_dtype(device, config.dtype)
    base = resolve_checkpoint(config.model)
    counts = {}

    def shard_on_load(m):  # on the meta device: no rank ever holds the whole model
        counts.update(apply_lora(m, config.lora))
        shard_model(m)

    model = load_model(base, device=device, dtype=dtype, experts="bf16" if config.full_finetune else "auto",
                       prepare=shard_on_load if config.fsdp else None)
    tokenizer = load_tokenizer(base)
    if config.full_finetune:
        model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        log(f"full fine-tuning: {sum(p.numel() for p in params):,} parameters")
    else:
        if not config.fsdp:
            counts = apply_lora(model, config.lora)
        params = lora_parameters(model)
        log(format_trainable_counts(counts, model))
        if config.fsdp:
            log(sharding_summary(model))
    configure_memory(model, gradient_checkpointing=config.gradient_checkpointing,
                     offload_activations=config.offload_activations, offload_embeddings=config.offload_embeddings,
                     activation_budget_gb=config.activation_budget_gb, dense_experts_gb=config.dense_experts_gb)
    model.train()
    captured = CapturedLogprobs(model) if config.capture_training and model.lm_head.weight.is_cuda else None
    W = ctx.world_size
    dropout = 0.0 if config.full_finetune else config.lora.dropout

    sequences, masks, dropped = tokenize_conversations(
        tokenizer, read_conversations(config.data), reasoning_effort=config.reasoning_effort,
        max_length=config.max_length)
    if dropped:
        log(f"dropped {dropped} conversations with no assistant tokens within max_length={config.max_length}")
    if not sequences:
        raise ValueError(f"{config.data}: no conversation has trainable tokens")
    B, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    micro_per_epoch = (len(sequences) + B - 1) // B
    steps_per_epoch = max(micro_per_epoch // (accum * W), 1)  # a step: accum micro-batches on each rank
    total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_train_epochs

    optimizer = make_optimizer(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                               offload=config.offload_optimizer)
    scheduler = make_scheduler(optimizer, kind=config.lr_scheduler_type, warmup_steps=config.warmup_steps,
                               total_steps=total_steps)
    scaler = make_loss_scaler(model)  # fp16 mode only; a pass-through otherwise
    out = Path(config.output_dir)
    metrics = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(dumps_toml(to_dict(config)))
        metrics = (out / "metrics.jsonl").open("a")

    def save(name: str) -> Path:
        adapter = None if config.full_finetune else lora_state_dict(model)  # gathered on every rank if sharded
        if not ctx.is_main:  # rank 0 writes; the others wait until it is on disk
            ctx.barrier()
            return out / name
        with atomic_directory(out / name) as tmp:
            if config.full_finetune:
                save_model(model, tmp)
            else:
                save_adapter(model, tmp / "adapter", base_model=str(base), state=adapter)
            for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json"):
                if (base / extra).is_file():
                    (tmp / extra).write_bytes((base / extra).read_bytes())
        ctx.barrier()
        return out / name

    order: list[int] = []
    step, start = 0, time.time()
    while step < total_steps:
        at_start = list(order), rng.getstate()

        def micro_batches() -> tuple[float, int]:
            """One step's micro-batches from zeroed gradients (and from the data order the step
            started with, when redone): (loss, trained tokens)."""
            nonlocal order
            order = list(at_start[0])
            rng.setstate(at_start[1])
            if captured is not None:
                captured.zero_grad()  # (its own buffers, which its graphs write)
            else:
                optimizer.zero_grad(set_to_none=True)
            loss_sum, token_sum = torch.zeros((), device=device), 0  # (read once the step's backwards are queued)
            for j in range(accum * W):  # the step's micro-batches in the global order; this rank's share
                if len(order) < B:
                    epoch = list(range(len(sequences)))
                    rng.shuffle(epoch)
                    order += epoch
                idx, order = order[:B], order[B:]
                if j % W != ctx.rank:
                    continue
                batch = pack_sequences([sequences[i] for i in idx], [masks[i] for i in idx],
                                       max_tokens=config.max_length).to(device)
                with micro_batch_rng(config.seed, step, j, enabled=dropout > 0):  # masks per global micro-batch
                    logprobs, _ = captured(batch) if captured is not None else sequence_logprobs(model, batch)
                loss = -logprobs.mean() / (accum * W)
                scaler.scale(loss).backward()
                loss_sum += loss.detach() * accum * W
                token_sum += logprobs.numel()
                del logprobs, loss  # (the graph goes before the next forward: see ossrl.train.graphed)
            return float(loss_sum), token_sum

        (loss_sum, token_sum), fell_back = with_checkpointing_fallback(model, micro_batches)
        fell_back = ctx.sum(int(fell_back)) > 0  # on any rank: logged by rank 0
        if fell_back:
            log(f"step {step + 1}: gradient_checkpointing 'auto' ran out of memory; the step was redone with "
                f"every layer checkpointed, which stays on for the rest of the run")
        ctx.all_reduce_grads(params)  # sums (a sharded model's were reduce-scattered already)
        update = optimizer_step(optimizer, scheduler, scaler, params, config.max_grad_norm)
        grad_norm = update["grad_norm"]
        step += 1
        loss_sum, token_sum = ctx.sum(loss_sum), int(ctx.sum(token_sum))
        record = {"step": step, "loss": loss_sum / (accum * W), "grad_norm": grad_norm,
                  "learning_rate": scheduler.get_last_lr()[0], "tokens": token_sum,
                  "seconds": round(time.time() - start, 3)}
        if fell_back:
            record["oom_fallbacks"] = 1
        if scaler.is_enabled():
            record.update(loss_scale=update["loss_scale"], overflow_steps=update["overflow"])
            if update["overflow"]:
                log(f"step {step}: fp16 gradients overflowed (inf/NaN); optimizer step skipped, "
                    f"loss scale {update['loss_scale']:g} -> {scaler.get_scale():g}")
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if step % config.logging_steps == 0 or step == total_steps:
            log(f"step {step}/{total_steps}  loss {record['loss']:.4f}  grad_norm {grad_norm:.3f}  "
                f"lr {record['learning_rate']:.2e}")
        if config.save_steps > 0 and step % config.save_steps == 0 and step < total_steps:
            save(f"checkpoints/step-{step}")
    if metrics is not None:
        metrics.close()
    final = save("final")
    log(f"saved {final}")
    return final


def sft_from_file(path: str | Path | None, overrides=()) -> Path:
    return train_sft(load_config(SFTConfig, path, overrides))
