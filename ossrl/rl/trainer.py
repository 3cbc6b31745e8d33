"""GRPOTrainer: rollouts, rewards, advantages, the policy loss, the optimiser step; logs and checkpoints.

    trainer = GRPOTrainer(model, reward_funcs=[fn, ...], train_dataset=rows, config=GRPOConfig(...))
    trainer.train()

One step: sample `prompts_per_step` rows; the engine generates `num_generations` completions for
each from the model itself (LoRA on, unmerged); reward functions score them (TRL contract);
group-normalised advantages; optionally drop zero-variance groups and top up (dynamic sampling);
then `num_iterations` optimiser steps on the packed prompt+completion sequences with the chosen
loss (dynamically loss-scaled in the fp16 mode). A step's randomness derives from (seed, step), and
checkpoints hold the optimiser, scheduler, loss scale, RNG states and data position, so a resumed run
continues exactly.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ossrl.configs import dumps_toml, to_dict
from ossrl.engine.engine import RolloutEngine
from ossrl.engine.sampling import SamplingParams
from ossrl.model.chat import assistant_stop_token_ids, render_prompt
from ossrl.model.lora import apply_lora, format_trainable_counts, lora_parameters, lora_state_dict
from ossrl.rl.config import GRPOConfig
from ossrl.train.distributed import DistContext, init_distributed
from ossrl.rl.logging import RunLogger
from ossrl.rl.loss import group_advantages
from ossrl.rl.rewards import compute_rewards, resolve_reward_func
from ossrl.rl.step import optimise_policy
from ossrl.train.graphed import CapturedLogprobs
from ossrl.model.adapters import load_adapter
from ossrl.train.checkpoint import atomic_directory, rng_state, save_adapter, set_rng_state
from ossrl.train.memory import configure_memory
from ossrl.train.optim import make_loss_scaler, make_optimizer, make_scheduler
from ossrl.train.sharding import (
    full_optimizer_state, is_sharded, load_optimizer_state, shard_model, sharding_summary,
)
from ossrl.train.sft import resolve_device_dtype

STATE_FILE = "trainer_state.pt"


@dataclass
class Rollout:
    """One group member: a prompt row and one of its completions."""

    row: dict
    prompt_ids: list[int]
    completion_ids: list[int]
    sampling_logprobs: list[float]
    finish_reason: str
    text: str


def load_dataset_rows(dataset) -> list[dict] | object:
    """A JSONL path, a list of dicts, or anything indexable with len() (e.g. datasets.Dataset)."""
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: dataset file not found")
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        dataset = rows
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        raise ValueError("train_dataset must be a non-empty JSONL path, list of dicts, or datasets.Dataset")
    if "prompt" not in dataset[0]:
        raise ValueError("every dataset row needs a 'prompt' (a string or a list of chat messages)")
    return dataset


class GRPOTrainer:
    def __init__(self, model=None, reward_funcs=None, train_dataset=None, config: GRPOConfig | None = None,
                 tokenizer=None, log=print, eval_dataset=None):
        from ossrl.model.loading import base_checkpoint, load_model, resolve_checkpoint
        from ossrl.model.tokenizer import load_tokenizer

        self.config = config = config or GRPOConfig()
        self.dist = dist = init_distributed()
        self.log = log if dist.is_main else (lambda *_: None)
        if config.prompts_per_step % dist.world_size:
            raise ValueError(f"prompts_per_step ({config.prompts_per_step}) must be divisible by the number of "
                             f"data-parallel processes ({dist.world_size}): a prompt's group stays on one rank")
        torch.manual_seed(config.seed)
        device = f"cuda:{dist.local_rank}" if config.device == "auto" and dist.enabled and torch.cuda.is_available() \
            else config.device
        self.device, dtype = resolve_device_dtype(device, config.dtype)
        self.base_path = None
        if config.fsdp and not dist.enabled:
            raise ValueError("fsdp = true needs several processes: torchrun --nproc-per-node N ossrl train ...")
        new_lora: dict[str, int] | None = None

        def shard_on_load(m):  # on the meta device: no rank ever holds the whole model
            nonlocal new_lora
            if getattr(m, "lora_config", None) is None:
                new_lora = apply_lora(m, config.lora)
            shard_model(m)

        if model is None or isinstance(model, (str, Path)):
            path = resolve_checkpoint(model or config.model)
            model = load_model(path, device=self.device, dtype=dtype, experts=config.experts,
                               prepare=shard_on_load if config.fsdp else None)
            self.base_path = base_checkpoint(path)  # an adapter directory names its base model
        elif config.model:
            self.base_path = Path(config.model)
        self.model = model
        self.device = str(model.device)
        if tokenizer is None:
            if self.base_path is None:
                raise ValueError("pass tokenizer=..., or config.model naming the checkpoint directory")
            tokenizer = load_tokenizer(self.base_path)
        self.tokenizer = tokenizer
        funcs = reward_funcs if reward_funcs is not None else config.reward_funcs
        if not funcs:
            raise ValueError("no reward functions: pass reward_funcs=[...] or set reward_funcs in the config")
        self.reward_funcs = [resolve_reward_func(f) if isinstance(f, str) else f for f in funcs]
        if config.reward_weights is not None and len(config.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for "
                             f"{len(self.reward_funcs)} reward functions")
        source = train_dataset if train_dataset is not None else config.dataset
        self.dataset = load_dataset_rows(source)
        self.dataset_name = str(source) if isinstance(source, (str, Path)) else "train_dataset"
        self._order: list[int] = []
        self._order_epoch = -1

        if getattr(model, "lora_config", None) is None:
            counts = apply_lora(model, config.lora)
            self.log(format_trainable_counts(counts, model))
        elif new_lora is not None:  # added while loading (fsdp)
            self.log(format_trainable_counts(new_lora, model))
        else:  # a checkpoint that already carries adapters (e.g. after SFT): continue training them
            self.log(f"continuing the model's existing LoRA adapters (r={model.lora_config.r}); "
                     f"the config's [lora] table is ignored")
        for p in lora_parameters(model):
            p.requires_grad_(True)
        configure_memory(model, gradient_checkpointing=config.gradient_checkpointing,
                         offload_activations=config.offload_activations, offload_embeddings=config.offload_embeddings,
                         activation_budget_gb=config.activation_budget_gb, dense_experts_gb=config.dense_experts_gb)
        if config.fsdp:
            if model.dtype == torch.float16:  # each rank would find overflows in its own shard only
                raise ValueError("fsdp with an fp16 model is not supported (loss scaling over sharded "
                                 "gradients); use bfloat16 or float32")
            if not is_sharded(model):  # a model passed in whole
                shard_model(model)  # parameters become shards: collected below
            self.log(sharding_summary(model))
        self.params = lora_parameters(model)
        self.engine = RolloutEngine(model, prefill_tokens=config.prefill_tokens)
        self.captured = CapturedLogprobs(model) if config.capture_training and model.device.type == "cuda" else None
        self.optimizer = make_optimizer(self.params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                        offload=config.offload_optimizer)
        self.scheduler = make_scheduler(self.optimizer, kind=config.lr_scheduler_type,
                                        warmup_steps=config.warmup_steps,
                                        total_steps=config.max_steps * config.num_iterations)
        self.scaler = make_loss_scaler(model)  # fp16 mode only; a pass-through otherwise
        self.stop_ids = assistant_stop_token_ids(tokenizer)
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.data_position = 0  # prompts consumed so far
        self.skipped_long_prompts = 0
        self.eval_prompts = self._eval_prompts(eval_dataset if eval_dataset is not None else config.eval_dataset)

    # ------------------------------------------------------------------ data
    def _row(self, position: int) -> tuple[int, dict]:
        """(dataset index, row) of the position-th prompt: a seeded shuffle per epoch."""
        n = len(self.dataset)
        epoch, i = divmod(position, n)
        if self._order_epoch != epoch:
            self._order = list(range(n))
            random.Random(self.config.seed * 7919 + epoch).shuffle(self._order)
            self._order_epoch = epoch
        index = self._order[i]
        return index, dict(self.dataset[index])

    def _render(self, row: dict, index: int, name: str) -> list[int]:
        try:
            return render_prompt(self.tokenizer, row["prompt"], reasoning_effort=self.config.reasoning_effort)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{name}: row {index} has no usable 'prompt' (a string or a list "
                             f"of chat messages): {type(e).__name__}: {e}") from None

    def _eval_prompts(self, source) -> list[tuple[dict, list[int]]]:
        """The eval rows (the first eval_max_prompts, if set) with their prompt ids; rows whose prompt
        is longer than max_prompt_length are left out, and said so."""
        if source is None or (isinstance(source, str) and not source):
            return []
        rows = load_dataset_rows(source)
        name = str(source) if isinstance(source, (str, Path)) else "eval_dataset"
        count = len(rows) if not self.config.eval_max_prompts else min(len(rows), self.config.eval_max_prompts)
        prompts = [(dict(rows[i]), self._render(dict(rows[i]), i, name)) for i in range(count)]
        kept = [(row, ids) for row, ids in prompts if len(ids) <= self.config.max_prompt_length]
        if len(kept) < len(prompts):
            self.log(f"{name}: {len(prompts) - len(kept)} of {len(prompts)} eval prompts are longer than "
                     f"max_prompt_length={self.config.max_prompt_length} and are left out")
        if not kept:
            raise ValueError(f"{name}: no eval prompt fits max_prompt_length={self.config.max_prompt_length}")
        return kept

    def _next_prompts(self, count: int) -> list[tuple[dict, list[int]]]:
        out = []
        tries = 0
        while len(out) < count:
            index, row = self._row(self.data_position)
            self.data_position += 1
            ids = self._render(row, index, self.dataset_name)
            if len(ids) > self.config.max_prompt_length:
                self.skipped_long_prompts += 1
                tries += 1
                if tries > 10 * len(self.dataset):
                    raise ValueError(f"no prompt fits max_prompt_length={self.config.max_prompt_length}")
                continue
            out.append((row, ids))
        return out

    # -------------------------------------------------------------- rollout
    def _sampling_params(self, attempt: int, first_prompt: int = 0) -> SamplingParams:
        """Completion j of the step's prompt i uses seed base + i*G + j, whichever rank draws it."""
        c = self.config
        base = (c.seed * 1_000_003 + self.step * 10_007 + attempt * 101) % (2 ** 62)
        return self._params(c.temperature, base + first_prompt * c.num_generations)

    def _params(self, temperature: float, seed: int) -> SamplingParams:
        """The config's sampling rule (top_p, top_k, min_p, length, stop tokens) at a temperature and seed."""
        c = self.config
        return SamplingParams(temperature=temperature, top_p=c.top_p, top_k=c.top_k, min_p=c.min_p,
                              max_new_tokens=c.max_completion_length, stop_token_ids=self.stop_ids, seed=seed)

    def _generate(self, prompts, params: SamplingParams, n: int) -> list[Rollout]:
        """n completions of each (row, prompt ids), prompt by prompt."""
        groups = self.engine.generate([ids for _, ids in prompts], n=n, params=params)
        rollouts = []
        for (row, ids), group in zip(prompts, groups):
            for c in group:
                rollouts.append(Rollout(row, ids, c.token_ids, c.sampling_logprobs, c.finish_reason,
                                        self.tokenizer.decode(c.token_ids)))
        return rollouts

    def _score(self, rollouts: list[Rollout]):
        columns: dict[str, list] = {}
        for key in rollouts[0].row:
            if key != "prompt":
                columns[key] = [r.row.get(key) for r in rollouts]
        return compute_rewards(self.reward_funcs, self.config.reward_weights,
                               prompts=[r.row["prompt"] for r in rollouts],
                               completions=[r.text for r in rollouts],
                               completion_ids=[r.completion_ids for r in rollouts],
                               columns=columns, stop_on_error=self.config.stop_on_reward_error)

    # ----------------------------------------------------------- evaluation
    def evaluate(self) -> tuple[dict, list[dict]]:
        """The policy on the eval prompts: eval_num_generations completions each at eval_temperature
        (fixed seeds, apart from training's: the same draws at every evaluation), rewarded by the
        training's reward functions. Returns ("eval/..." metrics over every rank's completions,
        their samples). Under data parallelism the prompts are split evenly over the ranks; each
        rank generates its share in calls no larger than a training step's generation (the KV pool
        is sized per call), and completion j of eval prompt i gets the same seed on any number of
        ranks."""
        c = self.config
        t0 = time.perf_counter()
        world, rank, n = self.dist.world_size, self.dist.rank, c.eval_num_generations
        size, extra = divmod(len(self.eval_prompts), world)
        first = rank * size + min(rank, extra)
        mine = self.eval_prompts[first:first + size + (rank < extra)]
        per_call = max(1, (c.prompts_per_step // world) * c.num_generations // n)
        calls = -(-(size + (extra > 0)) // per_call)  # the busiest rank's; every rank makes as many (lockstep)
        base = (c.seed * 1_000_003 + 2 ** 61) % (2 ** 62)  # (training's seeds start at seed * 1_000_003)
        rollouts = []
        for k in range(calls):
            part = mine[k * per_call:(k + 1) * per_call]
            if not part and not self.engine.lockstep:
                continue
            rollouts += self._generate(part, self._params(c.eval_temperature, base + (first + k * per_call) * n), n)
        samples, errors = [], {}
        if rollouts:
            result = self._score(rollouts)
            errors = result.errors
            samples = [{"prompt": r.row["prompt"], "completion": r.text, "reward": float(result.total[i]),
                        "finish_reason": r.finish_reason, "length": len(r.completion_ids),
                        "rewards": {k: v[i] for k, v in result.per_func.items()}}
                       for i, r in enumerate(rollouts)]
        if self.dist.enabled:
            parts = self.dist.gather((samples, errors))
            samples = [x for part, _ in parts for x in part]
            errors = {name: message for _, part in parts for name, message in part.items()}
        if c.enable_sleep_mode:
            self.engine.release()
        for name, message in errors.items():
            self.log(f"eval at step {self.step}: reward function '{name}' failed ({message}); its rewards are None")
        metrics = {"eval/completions": len(samples), "eval/reward_errors": len(errors),
                   "eval/time": time.perf_counter() - t0}
        if samples:
            rewards = torch.tensor([x["reward"] for x in samples], dtype=torch.float32)
            lengths = torch.tensor([float(x["length"]) for x in samples])
            metrics.update({
                "eval/reward": float(rewards.mean()),
                "eval/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
                "eval/completions/mean_length": float(lengths.mean()),
                "eval/completions/clipped_ratio": float(sum(x["finish_reason"] == "length" for x in samples))
                / len(samples),
                **{f"eval/{k}": v for k, v in _reward_columns(
                    {name: [x["rewards"][name] for x in samples] for name in samples[0]["rewards"]}).items()},
            })
        return metrics, samples

    def _log_eval(self, metrics: dict, samples: list[dict]) -> None:
        if self.dist.is_main and samples:
            with (self.output_dir / "eval_samples.jsonl").open("a") as f:
                f.write("".join(json.dumps({"step": self.step, **x}) + "\n" for x in samples))
        if "eval/reward" in metrics:
            self.log(f"eval at step {self.step}: reward {metrics['eval/reward']:.3f} over "
                     f"{metrics['eval/completions']} completions")

    def _eval_due(self) -> bool:
        c = self.config
        every = c.eval_steps > 0 and self.step % c.eval_steps == 0
        return bool(self.eval_prompts) and (self.step >= c.max_steps or every)

    # ---------------------------------------------------------------- train
    def train(self) -> Path:
        c = self.config
        if c.resume_from:
            self.resume(c.resume_from)
        logger = None
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(dumps_toml(to_dict(c)))
            logger = RunLogger(self.output_dir, report_to=c.report_to, progress_bar=c.progress_bar,
                               total_steps=c.max_steps, start_step=self.step, run_name=self.output_dir.name,
                               config=to_dict(c))
        try:
            if c.eval_on_start and self.eval_prompts and self.step == 0:
                metrics, samples = self.evaluate()
                self._log_eval(metrics, samples)
                if logger is not None:
                    logger.log_step(0, metrics)
            while self.step < c.max_steps:
                metrics, samples = self.train_step()
                if self._eval_due():
                    eval_metrics, eval_samples = self.evaluate()
                    self._log_eval(eval_metrics, eval_samples)
                    metrics = {**metrics, **eval_metrics}
                if logger is not None:
                    logger.log_step(self.step, metrics)
                    logger.log_samples(self.step, samples)
                if c.save_steps > 0 and self.step % c.save_steps == 0 and self.step < c.max_steps:
                    self.save_checkpoint()
            if c.save_steps > 0 or c.resume_from:
                self.save_checkpoint()  # the last step is resumable like any other (e.g. to train longer)
            final = self.save_checkpoint(name="final")
        finally:
            if logger is not None:
                logger.close()
        return final

    def train_step(self) -> tuple[dict, list[dict]]:
        c = self.config
        G = c.num_generations
        t0 = time.perf_counter()
        rollouts, rewards, kept_groups, retries = [], None, 0, 0
        time_generate = time_reward = 0.0
        generated_tokens = 0
        errors: dict[str, str] = {}
        per_func: dict[str, list] = {}
        all_group_std = []
        # Every rank draws the same global prompts and keeps its contiguous share.
        share = c.prompts_per_step // self.dist.world_size
        first = self.dist.rank * share
        pending = self._next_prompts(c.prompts_per_step)[first:first + share]
        while True:
            # Under data parallelism a rank may have nothing to top up this round; a sharded model's
            # ranks still all generate (their forwards gather shards together), some with no prompts.
            if pending or self.engine.lockstep:
                tg = time.perf_counter()
                batch = self._generate(pending, self._sampling_params(retries, first), G)
                time_generate += time.perf_counter() - tg
                generated_tokens += sum(len(r.completion_ids) for r in batch)
            if pending:
                tr = time.perf_counter()
                result = self._score(batch)
                time_reward += time.perf_counter() - tr
                errors.update(result.errors)
                total = torch.tensor(result.total, dtype=torch.float32)
                _, group_std = group_advantages(total, G, scale_rewards="none")
                all_group_std.append(group_std)
                keep = [g for g in range(len(pending)) if not c.dynamic_sampling or group_std[g] > 0]
                for g in keep:
                    if kept_groups >= share:
                        break
                    rollouts += batch[g * G:(g + 1) * G]
                    rewards = _cat(rewards, total[g * G:(g + 1) * G])
                    for name, values in result.per_func.items():
                        per_func.setdefault(name, []).extend(values[g * G:(g + 1) * G])
                    kept_groups += 1
            if not c.dynamic_sampling:
                break
            # Top-up, decided together: the ranks' missing groups are drawn from the global prompt
            # stream in rank order, so the prompts and seeds are those one process would draw.
            missing = self.dist.gather(share - kept_groups)
            if sum(missing) == 0 or retries >= c.max_dynamic_sampling_retries:
                break
            retries += 1
            drawn = self._next_prompts(sum(missing))
            first = sum(missing[:self.dist.rank])
            pending = drawn[first:first + missing[self.dist.rank]]
        if c.dynamic_sampling and self.dist.enabled:
            # Retries ran out with ranks holding different numbers of groups: every rank trains on
            # the smallest count, so the micro-batches and loss normalisers stay global.
            least = min(self.dist.gather(kept_groups))
            if least < kept_groups:
                self.log(f"step {self.step + 1}: dynamic sampling left ranks with different group counts; "
                         f"each trains on {least}")
                rollouts = rollouts[:least * G]
                rewards = rewards[:least * G] if least else None
                per_func = {k: v[:least * G] for k, v in per_func.items()}
                kept_groups = least
        group_std = torch.cat(all_group_std) if all_group_std else torch.zeros(0)
        metrics: dict = {
            "reward_errors": len(errors),
            "frac_reward_zero_std": float((group_std == 0).float().mean()) if group_std.numel() else 0.0,
            "groups_scored": int(group_std.numel()),
            "groups_zero_std": int((group_std == 0).sum()),
            "dynamic_sampling/retries": retries,
            "groups_used": kept_groups,
            "skipped_long_prompts": self.skipped_long_prompts,
        }
        for name, message in errors.items():
            self.log(f"step {self.step + 1}: reward function '{name}' failed ({message}); its rewards are None")
        if kept_groups == 0 or rewards is None:
            self.log(f"step {self.step + 1}: every group had identical rewards after {retries} retries; "
                     f"no learning signal, optimiser step skipped")
            self.step += 1
            for _ in range(c.num_iterations):  # the schedule follows steps, trained or not
                self.scheduler.step()
            metrics.update({"reward": float("nan"), "skipped_step": 1})
            return metrics, []
        if metrics["frac_reward_zero_std"] == 1.0:
            self.log(f"step {self.step + 1}: every group has identical rewards (zero advantages)")
        batch_std = None
        if c.scale_rewards == "batch" and self.dist.enabled:
            everything = torch.tensor([r for part in self.dist.gather(rewards.tolist()) for r in part])
            batch_std = float(everything.std())
        advantages, _ = group_advantages(rewards, G, scale_rewards=c.scale_rewards, batch_std=batch_std)

        if c.enable_sleep_mode:
            self.engine.release()  # the KV pool and graphs' memory go to the training phase
        tt = time.perf_counter()
        train_metrics = self._optimise(rollouts, advantages)
        time_train = time.perf_counter() - tt
        if train_metrics.get("overflow_steps"):
            self.log(f"step {self.step + 1}: fp16 gradients overflowed (inf/NaN) in {train_metrics['overflow_steps']} "
                     f"of {c.num_iterations} optimizer steps, which were skipped; loss scale now "
                     f"{self.scaler.get_scale():g}")
        if train_metrics.get("oom_fallbacks"):
            self.log(f"step {self.step + 1}: gradient_checkpointing 'auto' ran out of memory; the pass was redone "
                     f"with every layer checkpointed, which stays on for the rest of the run")

        lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
        truncated = torch.tensor([r.finish_reason == "length" for r in rollouts], dtype=torch.float32)
        metrics.update({
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.mean()),
            "time/generate": time_generate,
            "time/reward": time_reward,
            "time/train": time_train,
            "time/step": time.perf_counter() - t0,
            "tokens_per_second": generated_tokens / max(time_generate, 1e-9),
            "peak_memory_gb": _peak_memory_gb(),
            "checkpointed_layers": self.model.model.checkpointed_layers,  # in the last training forward
            "learning_rate": self.scheduler.get_last_lr()[0],
            **_reward_columns(per_func),
            **train_metrics,
        })
        self.step += 1
        samples = [{"prompt": r.row["prompt"], "completion": r.text, "reward": float(rewards[i]),
                    "advantage": float(advantages[i]), "finish_reason": r.finish_reason,
                    "rewards": {k: v[i] for k, v in per_func.items()}}
                   for i, r in enumerate(rollouts)]
        if self.dist.enabled:
            metrics, samples = _reduce_across_ranks(self.dist, metrics, samples)
        return metrics, samples

    def _optimise(self, rollouts: list[Rollout], advantages: torch.Tensor) -> dict:
        return optimise_policy(self.model, self.optimizer, self.scheduler, self.params, self.config,
                               rollouts, advantages, dist=self.dist, scaler=self.scaler, captured=self.captured)

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, name: str | None = None) -> Path:
        name = name or f"step-{self.step}"
        path = self.output_dir / ("checkpoints" if name != "final" else "") / name
        # A sharded model's adapter and optimizer state are gathered whole on every rank (collectives).
        adapter, optimizer = lora_state_dict(self.model), full_optimizer_state(self.optimizer)
        if not self.dist.is_main:  # rank 0 writes; the others wait until it is on disk
            self.dist.barrier()
            return path
        with atomic_directory(path) as tmp:
            save_adapter(self.model, tmp / "adapter", base_model=str(self.base_path) if self.base_path else None,
                         state=adapter)
            torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(), "step": self.step, "data_position": self.data_position,
                        "skipped_long_prompts": self.skipped_long_prompts, "rng": rng_state()}, tmp / STATE_FILE)
            (tmp / "config.toml").write_text(dumps_toml(to_dict(self.config)))
            if self.base_path is not None:
                for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                              "generation_config.json"):
                    if (self.base_path / extra).is_file():
                        shutil.copyfile(self.base_path / extra, tmp / extra)
        if name != "final" and self.config.save_total_limit:
            for old in _step_dirs(self.output_dir)[: -self.config.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path

    def resume(self, where: str | Path) -> None:
        if str(where) == "latest":
            dirs = _step_dirs(self.output_dir)
            if not dirs:
                self.log(f"resume_from=latest: no checkpoint in {self.output_dir / 'checkpoints'}; starting fresh")
                return
            where = dirs[-1]
        path = Path(where)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: not a resumable checkpoint")
        load_adapter(self.model, path / "adapter")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        load_optimizer_state(self.optimizer, state["optimizer"])  # sharded like the parameters, if they are
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when saved without loss scaling (bf16/fp32): keep the fresh scale
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.data_position = state["step"], state["data_position"]
        self.skipped_long_prompts = state.get("skipped_long_prompts", 0)
        set_rng_state(state["rng"])
        # Lines logged after this checkpoint (a crash between logging and saving) are redone.
        # A line cut by a crash mid-write does not parse: it is dropped too.
        for name in ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl") if self.dist.is_main else ():
            log_file = self.output_dir / name
            if log_file.is_file():
                kept = [line for line in log_file.read_text().splitlines() if _logged_step(line) <= self.step]
                log_file.write_text("".join(line + "\n" for line in kept))
        if self.dist.is_main:  # checkpoints newer than this one belong to an abandoned timeline
            for newer in _step_dirs(self.output_dir):
                if int(newer.name.split("-")[1]) > self.step:
                    shutil.rmtree(newer, ignore_errors=True)
        self.dist.barrier()
        self.log(f"resumed from {path} at step {self.step}")


def _logged_step(line: str) -> float:
    """The step of a metrics/samples line; infinity for a line that does not parse."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def _step_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _reduce_across_ranks(dist: DistContext, metrics: dict, samples: list[dict]) -> tuple[dict, list[dict]]:
    """Rank 0's view of a data-parallel step: reward and length statistics over every rank's
    completions, times as the slowest rank's, other figures averaged; all samples."""
    parts = dist.gather((metrics, samples))
    all_samples = [x for _, rank_samples in parts for x in rank_samples]
    merged: dict = {}
    for key in metrics:
        values = [m[key] for m, _ in parts if isinstance(m.get(key), (int, float))]
        if not values:
            continue
        if key.startswith("time/") or key in ("peak_memory_gb", "skipped_long_prompts", "checkpointed_layers",  # global counts
                                              "dynamic_sampling/retries"):
            merged[key] = max(values)
        elif key in ("reward_errors", "groups_used", "groups_scored", "groups_zero_std", "loss"):
            merged[key] = sum(values)
        elif key == "tokens_per_second":
            merged[key] = sum(values)  # ranks generate concurrently
        else:
            merged[key] = sum(values) / len(values)
    if merged.get("groups_scored"):
        merged["frac_reward_zero_std"] = merged["groups_zero_std"] / merged["groups_scored"]
    if all_samples:
        rewards = torch.tensor([x["reward"] for x in all_samples])
        merged["reward"] = float(rewards.mean())
        merged["reward_std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
    return merged, all_samples


def _reward_columns(per_func: dict[str, list]) -> dict:
    out = {}
    for name, values in per_func.items():
        present = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
        out[f"rewards/{name}/mean"] = float(present.mean()) if present.numel() else float("nan")
        out[f"rewards/{name}/std"] = float(present.std()) if present.numel() > 1 else 0.0
    return out


def _cat(a, b):
    return b.clone() if a is None else torch.cat((a, b))


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


def train_from_file(path, overrides=()) -> Path:
    from ossrl.configs import load_config

    config = load_config(GRPOConfig, path, overrides)
    return GRPOTrainer(config=config).train()


def evaluate_from_file(path, overrides=(), out_dir=None) -> tuple[Path | None, dict]:
    """`ossrl eval`: the config's model on its eval_dataset (else its dataset) with its reward
    functions and eval_* options, once. Writes eval.json (the metrics, the model, the prompts file)
    and eval_samples.jsonl to out_dir (default: OUTPUT_DIR/eval) on the main process, and returns
    (that directory or None on the other ranks, the metrics)."""
    from ossrl.configs import load_config

    config = load_config(GRPOConfig, path, overrides)
    source = config.eval_dataset or config.dataset
    if not source:
        raise ValueError(f"{path}: set eval_dataset (or dataset): the prompts to evaluate on")
    trainer = GRPOTrainer(config=config, train_dataset=source, eval_dataset=source)
    metrics, samples = trainer.evaluate()
    if not trainer.dist.is_main:
        return None, metrics
    out = Path(out_dir) if out_dir else Path(config.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": config.model, "eval_dataset": str(source), "eval_num_generations": config.eval_num_generations,
              "eval_temperature": config.eval_temperature, **metrics}
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "eval_samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    return out, metrics
