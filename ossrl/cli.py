"""The `ossrl` command line.

    ossrl generate --model DIR [--reasoning low] [--max-new-tokens N] [--temperature T] "prompt"
    ossrl demo                      # GRPO on the CPU: the bundled small gpt-oss learns 2048
    ossrl write-tiny DIR [--mxfp4]  # a tiny Hugging Face gpt-oss directory for tests and demos
    ossrl sft CONFIG.toml [key=value ...]   # supervised fine-tuning (LoRA or full)
    ossrl train CONFIG.toml [key=value ...]         # GRPO
    ossrl eval CONFIG.toml [key=value ...] [--out DIR]   # rewards on held-out prompts (e.g. model=runs/X/final)
    ossrl plot RUN_DIR                              # PNG curves of a run
    ossrl play2048 strategy.py [--games N]          # watch a 2048 strategy play in the terminal
    ossrl export CHECKPOINT --format adapter|merged-bf16|merged-mxfp4 OUT_DIR

Each subcommand is a thin layer over the library; see `ossrl <command> --help`. `train`, `eval`,
`sft` and `demo` take config overrides both ways: `key=value` words after the config and `--set key=value`
options. The words apply first, then the options, each kind in line order, so for a key given
both ways the --set value wins.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_generate(args) -> int:
    import torch

    from ossrl.engine.naive import generate_naive
    from ossrl.model.chat import assistant_stop_token_ids, parse_completion, render_prompt
    from ossrl.model.loading import load_model, resolve_checkpoint
    from ossrl.model.tokenizer import load_tokenizer

    device = args.device or _default_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    path = resolve_checkpoint(args.model)
    model = load_model(path, device=device, dtype=dtype)
    tokenizer = load_tokenizer(path)
    prompt = render_prompt(tokenizer, args.prompt, reasoning_effort=args.reasoning)
    completion = generate_naive(
        model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, stop_token_ids=assistant_stop_token_ids(tokenizer), seed=args.seed,
    )
    parsed = parse_completion(tokenizer, completion.token_ids)
    if args.show_analysis and parsed.analysis is not None:
        print("[analysis]")
        print(parsed.analysis)
        print("[final]")
    if parsed.final is not None:
        print(parsed.final)
    else:
        # A model that never opened a final channel (e.g. random tiny weights): show what it wrote.
        print(f"(no final channel in the completion; {len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason}; raw text follows)")
        print(tokenizer.decode(completion.token_ids))
    return 0


def cmd_demo(args) -> int:
    """GRPO on the CPU with the bundled small gpt-oss (ossrl/demo_model) and the 2048 rewards;
    then the reward curves, the before/after figures, and the best strategy played on a board."""
    import json
    import statistics

    import ossrl
    from ossrl.configs import load_config
    from ossrl.envs.tasks import make_2048_dataset
    from ossrl.rl.config import GRPOConfig
    from ossrl.rl.plots import plot_run
    from ossrl.rl.trainer import GRPOTrainer

    repo = Path(ossrl.__file__).resolve().parent.parent
    config_path = Path(args.config) if args.config else repo / "examples" / "2048-tiny.toml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the demo config is missing; run `ossrl demo` from a clone "
                                "of the repository or pass --config")
    overrides = args.overrides + args.set + ([f"max_steps={args.steps}"] if args.steps else []) + (
        [f"seed={args.seed}"] if args.seed is not None else [])
    config = load_config(GRPOConfig, config_path, overrides,
                         model=str(Path(ossrl.__file__).resolve().parent / "demo_model"),
                         output_dir=args.output_dir)
    prompts = repo / "examples" / "2048-prompts.jsonl"
    dataset = str(prompts) if prompts.is_file() else make_2048_dataset(64, seed=0)  # the same rows
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not config.resume_from:
        raise ValueError(f"{out} already holds a run; remove it or pass --output-dir")
    print(f"ossrl demo: GRPO on {config.device} with the bundled model, {config.max_steps} steps of "
          f"{config.prompts_per_step} prompts x {config.num_generations} completions ({config_path.name})")
    trainer = GRPOTrainer(config=config, train_dataset=dataset)
    trainer.train()

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if "reward" in m]  # training steps (not an eval_on_start line)
    k = min(5, len(metrics) // 2) or 1

    def mean(key, rows):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.fmean(values) if values else float("nan")

    print()
    for key, label in (("reward", "reward"), ("rewards/game2048_strategy_succeeds/mean", "strategy_succeeds"),
                       ("rewards/game2048_function_works/mean", "function_works"),
                       ("rewards/largest_tile/mean", "mean largest tile")):
        print(f"{label:>18}: first {k} steps {mean(key, metrics[:k]):8.2f}   last {k} steps "
              f"{mean(key, metrics[-k:]):8.2f}")
    for path in plot_run(out):
        print(f"plot: {path}")

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    last = max(s["step"] for s in samples)
    best = max((s for s in samples if s["step"] > last - k), key=lambda s: s["reward"])
    from ossrl.envs.code import extract_python_function

    source = extract_python_function(best["completion"], "strategy")
    if source is None:
        print("no completion of the last steps holds a strategy")
        return 0
    best_file = out / "best_strategy.py"
    best_file.write_text(source)
    print(f"\nbest strategy of the last {k} steps (reward {best['reward']:.2f}, step {best['step']}), "
          f"saved to {best_file}:\n")
    print(source)
    if args.no_play:
        return 0
    from ossrl.envs.play import play_main

    animate = sys.stdout.isatty()
    return play_main([str(best_file), "--games", "1", "--delay", "0.01"] + ([] if animate else ["--no-animate"]))


def cmd_write_tiny(args) -> int:
    from ossrl.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.out, seed=args.seed, mxfp4=args.mxfp4)
    print(path)
    return 0


def cmd_sft(args) -> int:
    from ossrl.train.distributed import exit_distributed_process
    from ossrl.train.sft import sft_from_file

    sft_from_file(args.config, args.overrides + args.set)
    exit_distributed_process()  # under torchrun; returns in a single process
    return 0


def cmd_train(args) -> int:
    from ossrl.rl.trainer import train_from_file
    from ossrl.train.distributed import exit_distributed_process

    final = train_from_file(args.config, args.overrides + args.set)
    print(f"final checkpoint: {final}")
    exit_distributed_process()  # under torchrun; returns in a single process
    return 0


def cmd_eval(args) -> int:
    from ossrl.rl.trainer import evaluate_from_file
    from ossrl.train.distributed import exit_distributed_process

    out, metrics = evaluate_from_file(args.config, args.overrides + args.set, out_dir=args.out)
    if out is not None:  # the main process
        shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print("\n".join(f"{k:>36}: {v:.4f}" for k, v in shown.items()))
        print(f"metrics: {out / 'eval.json'}\ncompletions: {out / 'eval_samples.jsonl'}")
    exit_distributed_process()
    return 0


def cmd_plot(args) -> int:
    from ossrl.rl.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_export(args) -> int:
    import torch

    from ossrl.export import export

    out = export(args.checkpoint, args.out_dir, format=args.format, base_model=args.base_model,
                 dtype=getattr(torch, args.dtype))
    print(out)
    return 0


def cmd_play2048(args) -> int:
    from ossrl.envs.play import play_main

    return play_main(args.args)


def cmd_bench(args) -> int:
    """Run a side-by-side benchmark script from a clone's benchmarks/ folder (GPU machines)."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: benchmarks ship with the repository; run from a clone")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossrl", description="GRPO for gpt-oss models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample a completion and print its final channel")
    g.add_argument("--model", required=True, help="checkpoint directory (or hub id when online)")
    g.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--show-analysis", action="store_true", help="also print the analysis channel")
    g.add_argument("prompt")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the bundled default: GRPO teaches a small gpt-oss 2048 on the CPU")
    d.add_argument("--config", default=None, help="default: examples/2048-tiny.toml of the repository")
    d.add_argument("--steps", type=int, default=None, help="override max_steps")
    d.add_argument("--seed", type=int, default=None, help="override the run's seed")
    d.add_argument("--output-dir", default="runs/demo-2048")
    _add_overrides(d)
    d.add_argument("--no-play", action="store_true", help="do not play the best strategy at the end")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="GRPO training from a TOML config (see ossrl.rl.config.GRPOConfig)")
    t.add_argument("config", help="TOML file (see ossrl.rl.config.GRPOConfig)")
    _add_overrides(t)
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("eval", help="rewards of a model or trained run on held-out prompts (a GRPO TOML config)")
    v.add_argument("config", help="TOML file (see ossrl.rl.config.GRPOConfig): its model (e.g. model=runs/NAME/final), "
                                  "reward functions, eval_dataset (else dataset) and eval_* options")
    _add_overrides(v)
    v.add_argument("--out", default=None, help="where eval.json and eval_samples.jsonl go (default: OUTPUT_DIR/eval)")
    v.set_defaults(func=cmd_eval)

    e = sub.add_parser("export", help="write a PEFT adapter, or a merged bf16 / MXFP4 HF checkpoint")
    e.add_argument("checkpoint", help="a run's checkpoint or final directory (or an adapter directory)")
    e.add_argument("out_dir")
    e.add_argument("--format", required=True, choices=("adapter", "merged-bf16", "merged-mxfp4"))
    e.add_argument("--base-model", default=None, help="override the base model named by the adapter")
    e.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of merged non-expert weights (float32 keeps the merge exact)")
    e.set_defaults(func=cmd_export)

    g2 = sub.add_parser("play2048", help="play a strategy (a .py file, a completion, or a run's samples.jsonl)",
                        add_help=False)
    g2.add_argument("args", nargs=argparse.REMAINDER, help="see `ossrl play2048 --help`")
    g2.set_defaults(func=cmd_play2048)

    b = sub.add_parser("bench", help="side-by-side benchmark against Hugging Face (GPU): generate, train, ...")
    b.add_argument("name", choices=("generate", "train", "grpo_step", "attention", "moe", "sandbox"))
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl into RUN_DIR/plots")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    s = sub.add_parser("sft", help="supervised fine-tuning on harmony conversations (TOML config)")
    s.add_argument("config", help="TOML file (see ossrl.train.sft.SFTConfig)")
    _add_overrides(s)
    s.set_defaults(func=cmd_sft)

    w = sub.add_parser("write-tiny", help="write a tiny random gpt-oss checkpoint (HF layout)")
    w.add_argument("out")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--mxfp4", action="store_true")
    w.set_defaults(func=cmd_write_tiny)
    return parser


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """Config overrides both ways: `key=value` words after the config, and `--set key=value`."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. max_steps=10 lora.r=8 (the same as --set)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (applied after the KEY=VALUE words)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line. `key=value` words after an option (`train C --set a=1 b=2`) join
    the overrides: argparse alone would have refused them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not hasattr(args, "overrides"):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    unknown = [word for word in extra if not _OVERRIDE.match(word)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = args.overrides + extra
    malformed = [word for word in args.overrides + args.set if not _OVERRIDE.match(word)]
    if malformed:
        parser.error(f"overrides must look like KEY=VALUE (e.g. max_steps=10), got: {' '.join(malformed)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["play2048"]:  # its own parser (ossrl.envs.play), --help included
        return cmd_play2048(argparse.Namespace(args=argv[1:]))
    args = parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # user errors: one clear line, no traceback
        print(f"ossrl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
