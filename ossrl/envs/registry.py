"""Short names of the environments' reward functions, for configs:

    reward_funcs = ["2048.function_works", "2048.no_cheating", "2048.strategy_succeeds"]

`ossrl.rl.rewards.resolve_reward_func` looks names up here; "module:function" works for any
other function. Scales are documented in `ossrl/envs/rewards.py`.
"""

from ossrl.envs import rewards

REWARD_FUNCS = {
    "2048.function_works": rewards.game2048_function_works,
    "2048.no_cheating": rewards.game2048_no_cheating,
    "2048.strategy_succeeds": rewards.game2048_strategy_succeeds,
    "matmul.function_works": rewards.matmul_function_works,
    "matmul.no_cheating": rewards.matmul_no_cheating,
    "matmul.correctness": rewards.matmul_correctness,
    "matmul.speed": rewards.matmul_speed,
}
