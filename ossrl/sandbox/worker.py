"""The sandbox worker: a standalone, standard-library-only program that runs ONE candidate.

Not imported by ossrl: the parent (`sandbox.py`) starts it as `python -I -S worker.py` with an
empty environment, cwd `/`, no inherited descriptors but its two pipes, optionally inside an
empty network namespace (`unshare --net`). The one thing to know: everything before the
audit hook is installed is trusted set-up; everything after it, including this file's own
loop, runs next to untrusted code, so the loop only uses operations the hook allows.

Set-up, in order: read the start message (JSON policy), pre-import the allowed modules (no
module is loaded after that), drop root to `nobody`, move the pipes off fds 0/1 and point
0/1/2 at /dev/null, set resource limits (address space, CPU, no file writes, no new
processes, few descriptors), build the restricted builtins and the import guard, install the
audit hook, report ready.

Protocol: every message is a 4-byte big-endian length and a payload.
  parent -> worker: JSON start message, then marshal tuples ("load", source, entry) and
                    ("call", seq, args, kwargs). (marshal: the parent is trusted.)
  worker -> parent: JSON only: ["ready", info], ["ok", seq, value, output],
                    ["fail", seq, category, exc_type, message, output].
"""

import builtins
import json
import marshal
import os
import resource
import sys
import types

_NOBODY = 65534
_MAX_DEPTH = 64  # nesting depth of a returned value
_SCALARS = frozenset({type(None), bool, int, float, str})
# Audit events that untrusted code may raise. Everything else is refused once the hook is in.
_ALLOWED_EVENTS = frozenset({
    "builtins.id", "compile", "exec", "marshal.loads", "marshal.dumps", "time.sleep",
    "array.__new__", "sys.excepthook", "sys.unraisablehook", "cpython._PySys_ClearAuditHooks",
    "sys._getframemodulename",  # 3.12+: namedtuple/enum ask their caller's module name
})
# Attributes that may not be set on any object (class swapping, code/global replacement).
_PROTECTED_SETATTR = frozenset({
    "__class__", "__code__", "__globals__", "__bases__", "__builtins__", "__dict__",
    "__closure__", "__defaults__", "__kwdefaults__", "__mro__",
})
# Audited reads that only give data (dataclasses reads __code__ through inspect.signature).
# Still refused: __globals__, and every frame (gi_frame, tb_frame, sys._getframe, ...).
_READABLE_AUDITED = frozenset({"__code__", "__defaults__", "__kwdefaults__", "gi_code",
                               "cr_code", "ag_code"})


class SandboxViolation(BaseException):
    """Raised by the guards. A BaseException so `except Exception` does not swallow it; a
    bare `except:` can, but the violation is recorded and the call is reported forbidden."""


# ---------------------------------------------------------------- framing
def _read_exact(fd, n):
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            os._exit(0)  # parent went away
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _recv(fd):
    return _read_exact(fd, int.from_bytes(_read_exact(fd, 4), "big"))


def _send(fd, payload):
    data = len(payload).to_bytes(4, "big") + payload
    while data:
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------- captured output
class _Output:
    """sys.stdout/sys.stderr of the candidate: keeps the first `cap` characters."""

    def __init__(self, cap):
        self.cap, self.size, self.parts = cap, 0, []

    def write(self, text):
        if type(text) is not str:
            raise TypeError("write() argument must be str")
        room = self.cap - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(len(text), room)
        return len(text)

    def flush(self):
        pass

    def take(self):
        out, self.parts = "".join(self.parts), []
        return out


# ---------------------------------------------------------------- guards
def _forbid(what):
    sys.audit("ossrl.sandbox.forbidden", what)
    raise SandboxViolation(what)  # only reached if no hook is installed


def _make_stub(name):
    def forbidden(*args, **kwargs):
        _forbid(f"call of {name}()")
    forbidden.__name__ = forbidden.__qualname__ = name
    return forbidden


def _make_attribute_builtins(config):
    safe = frozenset(config["safe_dunders"])
    internal = frozenset(config["internal_attributes"])
    real_getattr, real_setattr, real_delattr = getattr, setattr, delattr
    module_type = types.ModuleType

    def check(obj, name, write):
        if type(name) is not str:
            raise TypeError("attribute name must be str")
        if (name in internal or (name[:2] == "__" and name[-2:] == "__" and name not in safe)
                or (isinstance(obj, module_type) and (write or name[:1] == "_"))):
            _forbid(f"attribute {name!r}")

    def getattr_(obj, name, *default):
        check(obj, name, False)
        return real_getattr(obj, name, *default)

    def hasattr_(obj, name):
        check(obj, name, False)
        try:
            real_getattr(obj, name)
        except AttributeError:
            return False
        return True

    def setattr_(obj, name, value):
        check(obj, name, True)
        real_setattr(obj, name, value)

    def delattr_(obj, name):
        check(obj, name, True)
        real_delattr(obj, name)

    return {"getattr": getattr_, "hasattr": hasattr_, "setattr": setattr_, "delattr": delattr_}


def _make_import(allowed, modules):
    """`__import__` for the candidate: allowlisted, pre-imported modules only."""
    module_type = types.ModuleType

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            _forbid("relative import")
        if type(name) is not str or name not in allowed:
            _forbid(f"import of {name!r}")
        module = modules.get(name)
        if module is None:
            raise ImportError(f"module {name!r} is allowed but not installed")
        if not fromlist:
            return modules[name.partition(".")[0]]
        for item in fromlist:
            if type(item) is not str or item[:1] == "_":
                _forbid(f"import of {name}.{item}")
            if item == "*":
                if not hasattr(module, "__all__"):
                    _forbid(f"'from {name} import *' (module has no __all__)")
            elif f"{name}.{item}" not in allowed and isinstance(getattr(module, item, None), module_type):
                _forbid(f"import of {name}.{item}")
        return module

    return guarded_import


def _restricted_builtins(config, modules, output):
    table = {k: v for k, v in vars(builtins).items()
             if k not in ("__loader__", "__spec__", "__package__", "__import__")}
    for name in config["forbidden_builtins"]:
        table[name] = _make_stub(name)
    table.update(_make_attribute_builtins(config))
    table["__import__"] = _make_import(frozenset(config["allowed_modules"]), modules)

    def print_(*args, sep=" ", end="\n", file=None, flush=False):
        output.write((sep if sep is not None else " ").join(map(str, args)) + (end if end is not None else "\n"))
    table["print"] = print_
    return table


def _install_audit_hook(violations, permit):
    """The last line of the Python-level defence: refuses every event not known harmless.
    `violations` and `permit` live only here and in main()'s frame, which untrusted code
    cannot reach (frame access is itself refused)."""
    allowed, protected, readable = _ALLOWED_EVENTS, _PROTECTED_SETATTR, _READABLE_AUDITED

    def hook(event, args):
        if event in allowed or permit:  # permit: the worker rebuilding the entry function
            return
        if event == "object.__setattr__" or event == "object.__delattr__":
            if type(args[1]) is str and args[1] not in protected:
                return
        elif event == "object.__getattr__":
            if type(args[1]) is str and args[1] in readable:
                return
        if event == "sys._getframe":
            # collections.namedtuple asks for its caller's module and tolerates ValueError.
            raise ValueError("frames are not available in the sandbox")
        if event == "ossrl.sandbox.forbidden":
            what = args[0]
        elif event.startswith("object.") and len(args) > 1 and type(args[1]) is str:
            what = f"audit event {event!r} ({args[1]!r})"
        else:
            what = f"audit event {event!r}"
        violations.append(str(what))
        raise SandboxViolation(f"forbidden in the sandbox: {what}")

    sys.addaudithook(hook)


# ---------------------------------------------------------------- set-up
def _preimport(config):
    """Import every allowed module (and its parents) now: nothing is loaded later."""
    for path in config.get("extra_paths", ()):
        sys.path.append(path)
    for name in ("encodings.utf_8", "encodings.latin_1", "encodings.ascii"):
        __import__(name)
    modules = {}
    for name in config["allowed_modules"]:
        try:
            __import__(name)
        except Exception:  # not installed: the guard raises ImportError at run time
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            modules[".".join(parts[:i])] = sys.modules[".".join(parts[:i])]
    return modules


def _limit(info, name, value, hard=None):
    try:
        resource.setrlimit(getattr(resource, name), (value, value if hard is None else hard))
    except (ValueError, OSError):
        info["rlimits_failed"].append(name)


def _setup(config):
    info = {"pid": os.getpid(), "rlimits_failed": []}
    modules = _preimport(config)
    if config["drop_privileges"] and os.getuid() == 0:
        os.setgroups([])
        os.setgid(_NOBODY)
        os.setuid(_NOBODY)
    info["uid"] = os.getuid()
    rfd, wfd = os.dup(0), os.dup(1)  # non-inheritable copies of the pipes
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    max_fd = max(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) < 1024)
    cpu = config["cpu_seconds"]
    _limit(info, "RLIMIT_CPU", cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL at hard
    _limit(info, "RLIMIT_AS", config["memory_bytes"])
    _limit(info, "RLIMIT_FSIZE", 0)
    _limit(info, "RLIMIT_CORE", 0)
    _limit(info, "RLIMIT_NPROC", 0)  # no fork, no threads (not enforced for root)
    _limit(info, "RLIMIT_NOFILE", max_fd + 1)
    sys.setrecursionlimit(config["recursion_limit"])
    output = _Output(config["max_output_chars"])
    sys.stdout = sys.stderr = output
    table = _restricted_builtins(config, modules, output)
    return info, rfd, wfd, output, table


# ---------------------------------------------------------------- running the candidate
class _BadReturn(Exception):
    pass


def _check_plain(value, depth=0):
    """Exact plain types only: a str subclass with a lying __eq__ is refused, not sent."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if depth >= _MAX_DEPTH:
        raise _BadReturn(f"return value nested deeper than {_MAX_DEPTH} (or cyclic)")
    if kind is list or kind is tuple:
        for item in value:
            if type(item) not in _SCALARS:
                _check_plain(item, depth + 1)
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise _BadReturn(f"dict key of type {type(key).__name__}; only str keys")
            if type(item) not in _SCALARS:
                _check_plain(item, depth + 1)
    else:
        raise _BadReturn(f"returned a {kind.__name__}; only None/bool/int/float/str/list/tuple/dict")


def _describe(exc):
    try:
        message = str(exc)
    except BaseException:
        message = "<exception message could not be formatted>"
    return type(exc).__name__, message[:2000]


def _load(source, entry, table, permit):
    globals_ = {"__name__": "__candidate__", "__doc__": None, "__builtins__": table}
    exec(compile(source, "<candidate>", "exec"), globals_)
    fn = globals_.get(entry)
    if type(fn) is not types.FunctionType:
        raise LookupError(f"no function named {entry!r} at the top level of the source")
    permit.append(fn)
    try:
        if fn.__globals__ is not globals_:
            raise LookupError(f"{entry!r} is not defined by the candidate source")
        rebuilt = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
        rebuilt.__kwdefaults__ = fn.__kwdefaults__
    finally:
        permit.clear()
    return rebuilt


def _run(request, state, table, permit):
    """One request's untrusted part: load the source, or call the function."""
    if request[0] == "load" and state.get("fn") is None:
        state["fn"] = _load(request[1], request[2], table, permit)
        return None
    if request[0] == "call" and state.get("fn") is not None:
        return state["fn"](*request[2], **request[3])
    raise RuntimeError(f"protocol: unexpected {request[0]!r} request")


def _encode(seq, value, output, max_bytes):
    _check_plain(value)
    try:
        reply = json.dumps(["ok", seq, value, output.take()], separators=(",", ":")).encode()
    except (ValueError, RecursionError) as exc:  # e.g. an int with more than 4300 digits
        raise _BadReturn(f"return value cannot be encoded: {exc}") from None
    if len(reply) > max_bytes:
        raise _BadReturn(f"return value encodes to more than {max_bytes} bytes")
    return reply


def main():
    config = json.loads(_recv(0))
    info, rfd, wfd, output, table = _setup(config)
    max_bytes = config["max_message_bytes"]
    violations, permit, state = [], [], {}
    _install_audit_hook(violations, permit)
    _send(wfd, json.dumps(["ready", info]).encode())
    reserve = bytearray(1 << 20)  # freed to be able to answer after a MemoryError
    while True:
        request = marshal.loads(_recv(rfd))
        seq = request[1] if request[0] == "call" else 0
        fail = value = None
        try:
            value = _run(request, state, table, permit)
        except MemoryError:
            fail = ("memory", "MemoryError", "memory limit exceeded")
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, guards: all reported
            fail = ("error", *_describe(exc))
        if violations:
            fail = ("forbidden", "SandboxViolation", violations[0])
        if fail is None:
            try:
                reply = _encode(seq, value, output, max_bytes)
            except MemoryError:
                fail = ("memory", "MemoryError", "memory limit exceeded while encoding the result")
            except _BadReturn as exc:
                fail = ("bad_return", "BadReturn", str(exc))
            except BaseException as exc:  # a hostile __hash__/__str__ in a dict key, ...
                fail = ("bad_return", *_describe(exc))
            if violations:
                fail = ("forbidden", "SandboxViolation", violations[0])
        if fail is not None:
            if fail[0] == "memory":
                reserve = None
            reply = json.dumps(["fail", seq, *fail, output.take()]).encode()
        _send(wfd, reply)
        if fail is not None and fail[0] in ("memory", "forbidden"):
            os._exit(3)  # never serve another call; the parent kills us anyway


if __name__ == "__main__":
    main()
