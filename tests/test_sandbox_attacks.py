"""Red team: one attack program per reward-hacking or escape technique.

Each attack runs twice: under the default policy (static checks on), and with the static
checks off so that the runtime layers (import guard, restricted builtins, audit hook,
resource limits, process boundary) must contain it on their own. Attacks marked `deep` also
get dangerous modules (os, sys, socket, ...) allowed in the second run, to show that the
audit hook and the OS limits hold even when everything above them is gone. For every attack
the caller sees the expected error category, the failing stage ends within 2x its time
limit, and this process's state (clock functions, environment, modules, files) is untouched.
"""

import builtins
import dataclasses
import os
import sys
import time

import pytest

from ossrl.sandbox import DEFAULT_ALLOWED_MODULES, Policy, Sandbox, SandboxException

LIMIT_S = 1.0
BASE = dict(timeout_s=LIMIT_S, load_timeout_s=LIMIT_S, memory_bytes=256 << 20,
            max_message_bytes=1 << 20, max_output_chars=4096)
DANGEROUS = {"os", "sys", "socket", "ctypes", "subprocess", "signal", "threading", "gc", "stat"}
POLICIES = {
    "full": Policy(**BASE),
    "runtime": Policy(**BASE, static_checks=False),
    "deep": Policy(**BASE, static_checks=False, allowed_modules=DEFAULT_ALLOWED_MODULES | DANGEROUS),
}


@pytest.fixture(scope="module")
def sandboxes():
    boxes = {name: Sandbox(policy, prestart=1) for name, policy in POLICIES.items()}
    yield boxes
    for box in boxes.values():
        box.close()


@pytest.fixture(autouse=True)
def caller_state_untouched(tmp_path):  # tmp_path first: pytest imports getpass for it
    """Snapshot of what an attack might try to change in the caller; compared afterwards."""
    def snapshot():
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        return (time.perf_counter_ns, time.perf_counter, time.time, time.process_time,
                env, set(sys.modules), dict(vars(builtins)), os.getcwd())
    before = snapshot()
    yield
    after = snapshot()
    assert after[:4] == before[:4], "caller's clock functions changed"
    assert after[4] == before[4], "caller's environment changed"
    assert after[5] == before[5], "modules were imported into the caller"
    assert after[6] == before[6], "caller's builtins changed"
    assert after[7] == before[7], "caller's cwd changed"
    assert not os.path.exists("/tmp/pwned"), "an attack wrote a file"


def attempt(sandbox, source, args=()):
    """(category or 'ok', value or error, seconds of the stage that failed or the call)."""
    sandbox.wait_ready()  # worker start-up is not part of any time limit
    start = time.monotonic()
    try:
        with sandbox.open(source, "attack") as fn:
            start = time.monotonic()
            value = fn.call(args)
            return "ok", value, time.monotonic() - start, fn
    except SandboxException as exc:
        return exc.category, exc, time.monotonic() - start, None


@dataclasses.dataclass
class Attack:
    name: str
    source: str
    expect: str                 # category under the default policy
    runtime: str | None = None  # category with static checks off (None: same as expect)
    deep: bool = False          # second run also allows os, sys, socket, ctypes, ...


ATTACKS = [
    Attack("globals_for_cached_answers", "def attack():\n    return sorted(globals())\n", "forbidden"),
    Attack("caller_frame_via_generator", """
def gen():
    yield 1
def attack():
    g = gen()
    return str(g.gi_frame.f_back)
""", "forbidden"),
    Attack("caller_frame_via_traceback", """
def attack():
    try:
        1 / 0
    except Exception as e:
        return str(e.__traceback__.tb_frame.f_back.f_locals)
""", "forbidden"),
    Attack("frame_via_computed_getattr", """
def attack():
    g = (i for i in [1])
    return str(getattr(g, "gi_" + "frame"))
""", "forbidden"),
    Attack("subclasses_via_computed_getattr", """
def attack():
    cls = getattr(getattr((), "__cl" + "ass__"), "__ba" + "se__")
    return [c.__name__ for c in getattr(cls, "__subcl" + "asses__")()]
""", "forbidden"),
    Attack("os_via_dunder_import", "def attack():\n    return __import__('os').getcwd()\n", "forbidden"),
    Attack("numpy_via_computed_import", "def attack():\n    return str(__import__('num' + 'py'))\n",
           "forbidden"),
    Attack("importlib_import_module",
           "import importlib\ndef attack():\n    return importlib.import_module('os').getcwd()\n",
           "forbidden"),
    Attack("eval_string", "def attack():\n    return eval('1 + 1')\n", "forbidden"),
    Attack("exec_string", "def attack():\n    exec('x = 1')\n    return 1\n", "forbidden"),
    Attack("real_builtins_via_attrgetter", """
import operator
def attack():
    real_builtins = operator.attrgetter("__self__")(len)
    return operator.attrgetter("open")(real_builtins)("/etc/hostname").read()
""", "forbidden"),
    Attack("swallow_timeout_in_except", """
def attack():
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
""", "timeout"),
    Attack("while_true_bare_except", """
def attack():
    while True:
        try:
            x = 1
        except:
            pass
""", "timeout"),
    Attack("swallow_the_violation", """
def attack():
    try:
        __import__("o" + "s")
    except BaseException:
        pass
    return "clean"
""", "forbidden"),
    Attack("hang_on_input", "def attack():\n    return input()\n", "forbidden"),
    Attack("blocking_sleep", "import time\ndef attack():\n    time.sleep(100)\n", "timeout"),
    Attack("module_body_hangs", "while True:\n    pass\ndef attack():\n    return 1\n", "timeout"),
    Attack("ignore_signals_then_spin", """
import signal
def attack():
    for s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGALRM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    while True:
        pass
""", "forbidden", runtime="timeout", deep=True),
    Attack("always_equal_return_object", """
class Yes:
    def __eq__(self, other):
        return True
def attack():
    return Yes()
""", "bad_return"),
    Attack("lying_str_subclass_return", """
class S(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
def attack():
    return S("up")
""", "bad_return"),
    Attack("reduce_trick_return", """
class Evil(list):
    def __reduce__(self):
        return (print, ("pwned",))
def attack():
    return Evil([1])
""", "bad_return"),
    Attack("cyclic_return", "def attack():\n    x = []\n    x.append(x)\n    return x\n", "bad_return"),
    Attack("huge_return", "def attack():\n    return 'x' * (2 << 20)\n", "bad_return"),
    Attack("memory_bomb_allocation", "def attack():\n    return len(bytearray(10 ** 10))\n", "memory"),
    Attack("memory_bomb_growth", """
def attack():
    xs = []
    while True:
        xs.append(bytearray(10 ** 7))
""", "memory"),
    Attack("recursion_bomb", "def attack(n=0):\n    return attack(n + 1)\n", "error"),
    Attack("raise_system_exit", "def attack():\n    raise SystemExit(0)\n", "error"),
    Attack("raise_keyboard_interrupt", "def attack():\n    raise KeyboardInterrupt\n", "error"),
    Attack("raise_base_exception_subclass",
           "class Escape(BaseException):\n    pass\ndef attack():\n    raise Escape('out')\n", "error"),
    Attack("sys_exit", "import sys\ndef attack():\n    sys.exit(0)\n", "forbidden", runtime="error", deep=True),
    Attack("os_exit", "import os\ndef attack():\n    os._exit(0)\n", "forbidden", runtime="crash", deep=True),
    Attack("fork", "import os\ndef attack():\n    return os.fork()\n", "forbidden", deep=True),
    Attack("subprocess_run", "import subprocess\ndef attack():\n    return subprocess.run(['true']).returncode\n",
           "forbidden", deep=True),
    Attack("os_system", "import os\ndef attack():\n    return os.system('touch /tmp/pwned')\n",
           "forbidden", deep=True),
    Attack("thread_start", """
import threading
def attack():
    t = threading.Thread(target=lambda: None)
    t.start()
    return 1
""", "forbidden", deep=True,
           # 3.12+ audits thread creation; on 3.11 RLIMIT_NPROC=0 makes start() fail.
           runtime="forbidden" if sys.version_info >= (3, 12) else "error"),
    Attack("kill_parent", "import os\ndef attack():\n    os.kill(os.getppid(), 9)\n", "forbidden", deep=True),
    Attack("read_proc_environ", "def attack():\n    return open('/proc/self/environ').read()\n", "forbidden"),
    Attack("read_parent_proc_with_os", """
import os
def attack():
    return os.read(os.open("/proc/%d/environ" % os.getppid(), os.O_RDONLY), 100).decode()
""", "forbidden", deep=True),
    Attack("list_directory", "import os\ndef attack():\n    return os.listdir('/')\n", "forbidden", deep=True),
    Attack("write_file", "def attack():\n    open('/tmp/pwned', 'w').write('x')\n", "forbidden"),
    Attack("write_file_with_os", """
import os
def attack():
    fd = os.open("/tmp/pwned", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"x")
""", "forbidden", deep=True),
    Attack("socket_connect", """
import socket
def attack():
    s = socket.socket()
    s.connect(("127.0.0.1", 22))
    return 1
""", "forbidden", deep=True),
    Attack("ctypes_libc", "import ctypes\ndef attack():\n    return ctypes.CDLL(None).getpid()\n",
           "forbidden", deep=True),
    Attack("gc_get_objects", "import gc\ndef attack():\n    return len(gc.get_objects())\n",
           "forbidden", deep=True),
    Attack("sys_getframe", "import sys\ndef attack():\n    return str(sys._getframe(1).f_locals)\n",
           "forbidden", runtime="error", deep=True),
    Attack("garbage_on_the_result_pipe", """
import os, stat
def attack():
    for fd in range(3, 16):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, b"\\xff\\xff\\xff\\xff garbage")
        except OSError:
            pass
    return "honest"
""", "forbidden", runtime="crash", deep=True),
    Attack("delete_builtins", "def attack():\n    __builtins__.clear()\n    return 1\n", "forbidden", runtime="ok"),
    # Module attributes have no audit event: at run time the patch stays inside the worker.
    Attack("monkeypatch_module", "import math\ndef attack():\n    math.sqrt = abs\n    return 1\n",
           "forbidden", runtime="ok"),
]


def test_attack_count():
    assert len(ATTACKS) >= 30 and len({a.name for a in ATTACKS}) == len(ATTACKS)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_contained_by_static_and_runtime_layers(sandboxes, attack):
    category, value, seconds, _ = attempt(sandboxes["full"], attack.source)
    assert category == attack.expect, value
    assert seconds < 2 * LIMIT_S


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_contained_by_runtime_layers_alone(sandboxes, attack):
    box = sandboxes["deep" if attack.deep else "runtime"]
    category, value, seconds, _ = attempt(box, attack.source)
    assert category == (attack.runtime or attack.expect), value
    assert seconds < 2 * LIMIT_S


# ---------------------------------------------------------------- attacks with their own checks
def test_board_mutation_does_not_reach_the_caller(sandboxes):
    board = [[2, 0, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2]]
    snapshot = [row[:] for row in board]
    source = "def attack(board):\n    board[0][0] = 2048\n    board.append([9])\n    return 'left'\n"
    for box in ("full", "runtime"):
        category, value, _, _ = attempt(sandboxes[box], source, (board,))
        assert (category, value) == ("ok", "left")
    assert board == snapshot


def test_patched_timer_does_not_change_cpu_measured_outside(sandboxes):
    source = """
import time
def attack():
    time.perf_counter_ns = lambda: 0
    time.process_time = lambda: 0.0
    x = 0
    for i in range(3_000_000):
        x += i
    return time.perf_counter_ns()
"""
    assert attempt(sandboxes["full"], source)[0] == "forbidden"
    with sandboxes["runtime"].open(source, "attack") as fn:
        assert fn() == 0  # the patch only fooled the worker's own clock
        assert fn.last_cpu_ns > 20_000_000  # the work is still charged, read from /proc


def test_fake_score_prints_are_captured_not_parsed(sandboxes):
    source = """
def attack():
    print('["ok",1,"WIN",""]')
    print("SCORE: 1000000")
    return "left"
"""
    with sandboxes["full"].open(source, "attack") as fn:
        assert fn() == "left"
        assert "SCORE: 1000000" in fn.output and '"WIN"' in fn.output


def test_huge_output_is_truncated_at_the_cap(sandboxes):
    source = "def attack():\n    for i in range(100_000):\n        print('spam' * 10)\n    return 7\n"
    with sandboxes["full"].open(source, "attack") as fn:
        assert fn() == 7
        assert len(fn.output) == POLICIES["full"].max_output_chars


def test_recursion_bomb_is_an_error_and_the_function_survives(sandboxes):
    source = "def attack(n):\n    return n if n < 0 else attack(n + 1)\n"
    with sandboxes["full"].open(source, "attack") as fn:
        with pytest.raises(SandboxException) as info:
            fn(0)
        assert info.value.category == "error" and info.value.exc_type == "RecursionError"
        assert fn(-5) == -5


def test_environment_of_the_caller_is_not_visible(sandboxes, monkeypatch):
    monkeypatch.setenv("OSSRL_TEST_SECRET", "hunter2")
    source = "import os\ndef attack():\n    return dict(os.environ)\n"
    box = Sandbox(POLICIES["deep"], prestart=0)  # workers started after the secret was set
    try:
        category, value, _, _ = attempt(box, source)
    finally:
        box.close()
    assert category == "ok" and "OSSRL_TEST_SECRET" not in value and "hunter2" not in str(value)
    monkeypatch.delenv("OSSRL_TEST_SECRET")


def test_inherited_file_descriptors_do_not_reach_the_caller(sandboxes, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("answers")
    handle = open(secret)  # open in the caller while the worker starts
    source = """
import os
def attack():
    found = []
    for fd in range(0, 256):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        found.append([fd, st.st_ino])
    return found
"""
    box = Sandbox(POLICIES["deep"], prestart=0)
    try:
        category, fds, _, _ = attempt(box, source)
    finally:
        box.close()
        handle.close()
    assert category == "ok"
    assert os.stat(secret).st_ino not in [ino for _, ino in fds]
    assert len(fds) <= 5  # /dev/null on 0, 1, 2 and the two protocol pipes


def test_worker_runs_unprivileged_and_offline(sandboxes):
    with sandboxes["full"].open("def attack():\n    return 1\n", "attack") as fn:
        if os.geteuid() == 0:
            assert fn.info["uid"] != 0
        assert fn.info["rlimits_failed"] == []
        assert fn() == 1
