"""check_source: what the static layer refuses and what it lets through."""

import pytest

from ossrl.sandbox import Policy, check_source


def kinds(source, policy=None):
    return [v.kind for v in check_source(source, policy)]


LEGIT = '''
import math, random, itertools, heapq
from collections import defaultdict, deque, namedtuple
from functools import lru_cache
from dataclasses import dataclass

Point = namedtuple("Point", "x y")

@dataclass
class Node:
    value: int = 0
    __slots__ = ()

class Grid:
    def __init__(self, rows):
        self.rows = rows
    def __eq__(self, other):
        return isinstance(other, Grid) and self.rows == other.rows
    def __repr__(self):
        return f"{type(self).__name__}({self.rows})"

class Sub(Grid):
    def __init__(self, rows):
        super().__init__(rows)

@lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

def strategy(board):
    best = max(range(4), key=lambda m: random.random() + math.sqrt(m))
    return "WASD"[best]

if __name__ == "__main__":
    print(strategy([[0] * 4] * 4))
'''


def test_legitimate_code_has_no_violations():
    assert check_source(LEGIT) == []


@pytest.mark.parametrize("source, kind", [
    ("def f(:\n  pass", "syntax"),
    ("import os", "import"),
    ("import os.path", "import"),
    ("from os import path", "import"),
    ("from . import x", "import"),
    ("from random import _os", "import"),
    ("import importlib", "import"),
    ("x = __import__('os')", "name"),
    ("exec('1')", "name"),
    ("eval('1')", "name"),
    ("compile('1', 'f', 'exec')", "name"),
    ("open('/etc/passwd')", "name"),
    ("g = globals()", "name"),
    ("l = locals()", "name"),
    ("v = vars()", "name"),
    ("breakpoint()", "name"),
    ("x = input()", "name"),
    ("b = __builtins__", "name"),
    ("x = ().__class__", "attribute"),
    ("x = object.__subclasses__()", "attribute"),
    ("def f(): pass\nf.__globals__", "attribute"),
    ("def f(): pass\nf.__code__", "attribute"),
    ("x = len.__self__", "attribute"),
    ("def g(): yield 1\ng().gi_frame.f_back", "attribute"),
    ("try:\n 1/0\nexcept Exception as e:\n e.__traceback__.tb_frame", "attribute"),
    ("x = getattr(int, '__subclasses__')", "attribute"),
    ("import random\nrandom._os", "attribute"),
    ("import time\ntime.perf_counter_ns = lambda: 0", "module"),
    ("import time as t\ndel t.sleep", "module"),
    ("__builtins__ = {}", "name"),
])
def test_refused_construct_is_reported(source, kind):
    assert kind in kinds(source)


@pytest.mark.parametrize("source", ["import collections.abc", "from collections import abc"])
def test_submodule_refused_unless_listed(source):
    assert kinds(source, Policy(allowed_modules={"collections"})) == ["import"]


def test_submodule_allowed_when_listed():
    policy = Policy(allowed_modules={"collections", "collections.abc"})
    assert check_source("import collections.abc\nfrom collections import abc", policy) == []


def test_violation_carries_line_number():
    (violation,) = check_source("x = 1\n\nimport socket\n")
    assert violation.lineno == 3 and "socket" in violation.message


def test_oversized_source_is_refused():
    assert kinds("x = 1\n" * 10, Policy(max_source_bytes=20)) == ["size"]


def test_non_string_source_is_refused():
    assert kinds(b"x = 1") == ["syntax"]
