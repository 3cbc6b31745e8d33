"""Extracting the candidate's function from a completion, and the static verdict on it."""

import time

from ossrl.envs.code import completion_answer, extract_python_function, static_problem

GOOD = "def strategy(board):\n    return 'W'\n"


def harmony(final=None, analysis="Let me think.", stop="<|return|>"):
    text = f"<|channel|>analysis<|message|>{analysis}<|end|>"
    if final is not None:
        text += f"<|start|>assistant<|channel|>final<|message|>{final}{stop}"
    return text


def test_final_channel_fenced_block_with_prose_around():
    final = f"Here is my strategy:\n\n```python\n{GOOD}```\n\nIt always moves up."
    assert extract_python_function(harmony(final), "strategy") == GOOD


def test_code_only_in_the_analysis_channel_is_not_an_answer():
    text = harmony(final=None, analysis=f"draft:\n```python\n{GOOD}```")
    assert completion_answer(text) is None
    assert extract_python_function(text, "strategy") is None
    assert extract_python_function(harmony("I give up."), "strategy") is None


def test_missing_language_tag_tilde_fences_and_py_tag():
    for fence_open, fence_close in (("```", "```"), ("```py", "```"), ("~~~python", "~~~"), ("```Python3", "```")):
        final = f"{fence_open}\n{GOOD}{fence_close}\n"
        assert extract_python_function(harmony(final), "strategy") == GOOD, fence_open


def test_last_block_defining_the_function_wins_and_other_blocks_are_skipped():
    helper = "def helper(x):\n    return x\n"
    second = "import random\n\ndef strategy(board):\n    return random.choice('WASD')\n"
    final = (f"First try:\n```python\n{GOOD}```\nBetter:\n```python\n{second}```\n"
             f"And a helper:\n```python\n{helper}```\n```js\nfunction strategy(b) {{ return 'W'; }}\n```")
    assert extract_python_function(harmony(final), "strategy") == second


def test_plain_text_without_harmony_markup_is_the_whole_answer():
    assert extract_python_function(GOOD, "strategy") == GOOD
    assert extract_python_function(f"Sure!\n```\n{GOOD}```", "strategy") == GOOD
    assert extract_python_function("just words, no code", "strategy") is None
    assert extract_python_function(f"Sure, here it is:\n{GOOD}", "strategy") == GOOD


def test_truncated_completion_with_an_unclosed_fence():
    cut = harmony(f"```python\n{GOOD}", stop="")  # the token limit hit before ``` and <|return|>
    assert extract_python_function(cut, "strategy") == GOOD
    cut_mid = harmony("```python\ndef strategy(board):\n    return [", stop="")
    assert extract_python_function(cut_mid, "strategy").startswith("def strategy")  # a syntax error, reported later


def test_parsing_block_preferred_over_a_later_broken_one_and_broken_kept_when_alone():
    broken = "def strategy(board)\n    return 'W'\n"
    final = f"```python\n{GOOD}```\nalso\n```python\n{broken}```"
    assert extract_python_function(harmony(final), "strategy") == GOOD
    assert extract_python_function(harmony(f"```python\n{broken}```"), "strategy") == broken


def test_function_must_be_defined_at_top_level_with_that_exact_name():
    nested = "class A:\n    def strategy(self, board):\n        return 'W'\n"
    assert extract_python_function(harmony(f"```python\n{nested}```"), "strategy") is None
    assert extract_python_function(harmony("```python\ndef strategy_v2(b):\n    return 'W'\n```"), "strategy") is None


def test_garbage_inputs_return_none_quickly():
    start = time.monotonic()
    for junk in (None, 123, b"bytes", "", "<|channel|>", "```", "```python\n" * 10000,
                 "<|start|><|message|><|end|>" * 1000, "\x00\xff" * 100000,
                 [{"role": "assistant", "content": None}], [1, 2, 3]):
        assert extract_python_function(junk, "strategy") is None, repr(junk)[:40]
    # text that names the function but never parses comes back, to be reported as a syntax error
    assert static_problem(extract_python_function("def strategy(" * 20000, "strategy"))[0] == "syntax"
    assert time.monotonic() - start < 5


def test_conversational_completion_form():
    messages = [{"role": "assistant", "content": f"```python\n{GOOD}```"}]
    assert extract_python_function(messages, "strategy") == GOOD


def test_static_problem_categories():
    assert static_problem(GOOD) is None
    assert static_problem(None)[0] == "no_code"
    assert static_problem("def strategy(:\n")[0] == "syntax"
    assert static_problem("import subprocess\n" + GOOD)[0] == "forbidden"
    assert static_problem("import time\ntime.perf_counter_ns = lambda: 0\n" + GOOD)[0] == "forbidden"
    assert static_problem("x = '" + "a" * (2 << 20) + "'\n" + GOOD)[0] == "too_large"
