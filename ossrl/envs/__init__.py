"""ossrl.envs: tasks for GRPO and their honest reward functions (see docs/tutorial-2048.md).

    game2048.py   the 2048 rules, a seeded game, a terminal renderer (pure Python, trusted)
    strategy.py   evaluate_strategy: the harness plays 2048, a candidate's strategy() picks moves
    matmul.py     evaluate_kernel: a candidate's matmul() checked and timed against a triple loop
    code.py       extract_python_function: the candidate's source from a harmony completion
    pool.py       the shared sandbox pool, the bounded result cache, parallel evaluation
    rewards.py    reward functions (TRL contract) and their scales
    registry.py   REWARD_FUNCS: short names ("2048.strategy_succeeds") for configs
    tasks.py      prompts and datasets (rows with per-row seeds)
    play.py       `ossrl play2048 strategy.py`: watch a strategy play in the terminal

Untrusted code only ever runs through ossrl.sandbox; the harnesses here own the games,
the inputs and the clocks.
"""
