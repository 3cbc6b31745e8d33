"""Getting a candidate's Python out of a completion, and saying what is wrong with it statically.

    extract_python_function(completion_text, "strategy") -> source | None
    completion_answer(completion) -> the final-channel text | None
    static_problem(source, policy) -> (category, message) | None

The one thing to know (the decision on fallbacks): only the model's *answer* counts. For a
completion in harmony form (it contains `<|channel|>`, `<|message|>`, ...) that is the last
final-channel message, even when cut short by the token limit; code that appears only in the
analysis channel is not an answer, so a completion without a final channel yields None. Text
with no harmony markup at all (another model, a hand-written answer, a test) is the answer as a
whole. Within the answer, the last fenced block that defines the function wins (language tag
optional, prose around it ignored); with no fences, the answer from its first line that looks
like code (import/from/def/class/@), or the whole answer.
"""

from __future__ import annotations

import ast
import re
import textwrap

from ossrl.model.chat import parse_completion_text
from ossrl.sandbox import Policy, check_source

_HARMONY_RE = re.compile(r"<\|(?:start|end|message|channel|return|call|constrain)\|>")
# ``` or ~~~ fences, optional info string, body, closing fence (or the end of the text: a
# completion cut by the token limit may never close its last block).
_FENCE_RE = re.compile(r"^[ \t]*(```+|~~~+)[ \t]*([\w+.#-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)",
                       re.MULTILINE | re.DOTALL)
_NOT_PYTHON = frozenset({"javascript", "js", "typescript", "ts", "c", "cpp", "c++", "java", "rust",
                         "go", "bash", "sh", "shell", "console", "json", "yaml", "toml", "html"})
_CODE_START_RE = re.compile(r"^(?:import |from |def |async def |class |@)", re.MULTILINE)
MAX_COMPLETION_CHARS = 200_000  # longer answers are cut before searching (regex cost)


def completion_answer(completion) -> str | None:
    """The text of the model's answer (see the module docstring). Accepts a str, or TRL's
    conversational form (a list of {"role", "content"} dicts: the last assistant content)."""
    if isinstance(completion, (list, tuple)):
        contents = [m.get("content") for m in completion
                    if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        completion = contents[-1] if contents else None
    if not isinstance(completion, str):
        return None
    if not _HARMONY_RE.search(completion):
        return completion
    return parse_completion_text(completion).final


def _defines(tree: ast.Module, name: str) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
               for node in tree.body)


def _parses_with(source: str, name: str) -> bool:
    try:
        return _defines(ast.parse(source), name)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def extract_python_function(completion_text, name: str) -> str | None:
    """The source of the last Python block in the answer that defines top-level `name`.

    A block that defines `name` but does not parse is returned only when no block parses, so
    that a syntax error is reported as one (not as "no code"). Never raises."""
    try:
        answer = completion_answer(completion_text)
        if not answer:
            return None
        answer = answer[:MAX_COMPLETION_CHARS]
        defines_re = re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", re.MULTILINE)
        blocks = [body for _, tag, body in _FENCE_RE.findall(answer) if tag.lower() not in _NOT_PYTHON]
        if not blocks:  # unfenced: the whole answer, or from its first line that looks like code
            start = _CODE_START_RE.search(answer)
            blocks = [answer] + ([answer[start.start():]] if start and start.start() else [])
        blocks = [textwrap.dedent(b).strip("\n") + "\n" for b in blocks]  # a block indented as a whole
        candidates = [b for b in blocks if defines_re.search(b)]
        for block in reversed(candidates):
            if _parses_with(block, name):
                return block
        return candidates[-1] if candidates else None
    except Exception:  # noqa: BLE001 - garbage in, None out
        return None


def static_problem(source: str | None, policy: Policy | None = None) -> tuple[str, str] | None:
    """(category, message) when `source` cannot run, else None. Categories: no_code, syntax,
    too_large (not cheating) and forbidden (an import or construct the sandbox refuses)."""
    if not source:
        return ("no_code", "no Python function found in the final answer")
    violations = check_source(source, policy or Policy())
    if not violations:
        return None
    by_kind = {v.kind: v for v in violations}
    if "syntax" in by_kind:
        return ("syntax", str(by_kind["syntax"]))
    if "size" in by_kind:
        return ("too_large", str(by_kind["size"]))
    return ("forbidden", "; ".join(str(v) for v in violations[:5]))
