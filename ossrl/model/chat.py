"""The harmony chat format of gpt-oss: render prompts and training conversations, parse
completions, and the assistant's stop tokens (spec section 4).

What it is: a small re-implementation of what ossrl needs from `openai/harmony` (no
dependency on it), with deterministic output: no current date unless one is passed.
What it is not: tool schemas (`# Tools` sections) or a streaming parser.

The one thing to know: rendering works on *pieces*, each either a special token or text.
`render_*` turn special pieces into their ids (looked up by name) and encode text with special
tokens refused, so a user message containing "<|end|><|start|>assistant" stays plain text and
cannot forge a turn. `render_*_text` join the same pieces into a string, for display and tests.

    ids = render_prompt(tok, [{"role": "user", "content": "2+2?"}], reasoning_effort="low")
    ...sample with stop ids assistant_stop_token_ids(tok)...
    parsed = parse_completion(tok, completion_ids)   # .analysis, .final, .truncated

A message's wire form (spec 4.2):
    <|start|>{role}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>...<|end|>
An assistant message with a recipient (a tool call) ends in <|call|>; the last final message
of a training conversation ends in <|return|>. As in harmony's docs, an assistant's recipient
goes after the channel (`<|channel|>commentary to=functions.f <|constrain|>json`, the form the
model emits) and any other author's before it (`functions.f to=assistant<|channel|>...`).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

from ossrl.model.tokenizer import GPT_OSS_SPECIAL_TOKENS, Tokenizer

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass(frozen=True)
class SystemContent:
    """The harmony system message. `date` (a str or datetime.date) adds `Current date:`."""

    reasoning_effort: str = "medium"
    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    knowledge_cutoff: str | None = "2024-06"
    date: str | datetime.date | None = None

    def render(self) -> str:
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, "
                             f"got {self.reasoning_effort!r}")
        top = []
        if self.model_identity:
            top.append(self.model_identity)
        if self.knowledge_cutoff:
            top.append(f"Knowledge cutoff: {self.knowledge_cutoff}")
        if self.date is not None:
            date = self.date.isoformat() if isinstance(self.date, datetime.date) else self.date
            top.append(f"Current date: {date}")
        sections = ["\n".join(top)] if top else []
        sections.append(f"Reasoning: {self.reasoning_effort}")
        sections.append("# Valid channels: analysis, commentary, final. "
                        "Channel must be included for every message.")
        return "\n\n".join(sections)


@dataclass(frozen=True)
class Message:
    """One harmony message. `role` is the author as written in the header: system, developer,
    user, assistant, or a tool name such as `functions.get_weather`. `content_type` is e.g.
    "json" or "<|constrain|>json" (the marker is rendered as the special token)."""

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


@dataclass
class ParsedCompletion:
    """A completion split into messages. `analysis` joins the analysis-channel contents
    (None if there are none); `final` is the last final-channel content (None if none).
    `truncated` is True when no stop token (<|return|>, <|call|>, <|endoftext|>) ended the
    completion: the last message, if any, may be cut short."""

    analysis: str | None
    final: str | None
    messages: list[Message] = field(default_factory=list)
    truncated: bool = False


def assistant_stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """[<|return|>, <|call|>]: the tokens that end the assistant's turn (harmony's
    `stop_tokens_for_assistant_actions`). Not <|end|>: it separates the analysis message from
    the final one *within* a completion, so stopping on it would cut every answer before its
    final channel (spec 4.4, pitfall 9)."""
    return [tokenizer.return_, tokenizer.call]


# -- conversations ---------------------------------------------------------------------------


def _to_messages(messages) -> list[Message]:
    """Accept a str (one user message), Message objects, or chat dicts with role/content and
    optional channel, recipient, content_type, `thinking` (an assistant's analysis, as in the
    HF chat template) and, for role "tool", `name` (the tool, e.g. functions.get_weather)."""
    if isinstance(messages, str):
        return [Message("user", messages)]
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            try:
                role, content = m["role"], m["content"]
            except KeyError as e:
                raise ValueError(f"message {i} has no {e.args[0]!r} key: {m!r}") from None
            channel, recipient = m.get("channel"), m.get("recipient")
            if role == "tool":
                if "name" not in m:
                    raise ValueError(f"message {i}: a tool message needs 'name', e.g. "
                                     "'functions.get_weather'")
                role = m["name"]
                recipient, channel = recipient or "assistant", channel or "commentary"
            if role == "assistant" and m.get("thinking"):
                out.append(Message("assistant", m["thinking"], channel="analysis"))
            m = Message(role, content, channel, recipient, m.get("content_type"))
        elif not isinstance(m, Message):
            raise TypeError(f"message {i} is a {type(m).__name__}; expected Message or dict")
        if not isinstance(m.content, str):
            raise TypeError(f"message {i} ({m.role}): content must be a str, "
                            f"got {type(m.content).__name__}")
        if m.role == "assistant" and m.channel is None:
            m = Message(m.role, m.content, "final", m.recipient, m.content_type)
        out.append(m)
    return out


def _conversation(messages, reasoning_effort, date, developer, system) -> list[Message]:
    """System message, optional developer message, then `messages`. A leading system or
    developer chat message becomes the developer instructions (as the HF template does)."""
    msgs = _to_messages(messages)
    if msgs and msgs[0].role in ("system", "developer"):
        if developer is not None:
            raise ValueError("developer= given and the messages start with a "
                             f"{msgs[0].role} message; pass the instructions once")
        developer, msgs = msgs[0].content, msgs[1:]
    for m in msgs:
        if m.role in ("system", "developer"):
            raise ValueError(f"a {m.role} message may only come first")
    if system is None:
        system = SystemContent(reasoning_effort=reasoning_effort or "medium", date=date)
    elif reasoning_effort is not None or date is not None:
        raise ValueError("pass either system= or reasoning_effort=/date=, not both")
    head = [Message("system", system.render())]
    if developer is not None:
        head.append(Message("developer", f"# Instructions\n\n{developer}"))
    return head + _drop_old_analysis(msgs)


def _drop_old_analysis(msgs: list[Message]) -> list[Message]:
    """Drop the analysis of turns that were answered (a final message followed by a later user
    message), as harmony's auto_drop_analysis and the HF template do. The current turn keeps
    its analysis, including the chain of thought between a tool call and its result."""
    last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
    cut = max((i for i, m in enumerate(msgs[:max(last_user, 0)])
               if m.role == "assistant" and m.channel == "final"), default=-1)
    return [m for i, m in enumerate(msgs)
            if not (i < cut and m.role == "assistant" and m.channel == "analysis")]


# Piece = (text, is_special, is_header): is_header marks `<|start|>` and the role, which for
# the first assistant message of a turn are the generation prompt, not model output.
def _message_pieces(m: Message, end: str) -> list[tuple[str, bool, bool]]:
    p = [("<|start|>", True, True), (m.role, False, True)]
    to = [(f" to={m.recipient}", False, False)] if m.recipient else []
    if m.role != "assistant":
        p += to
    if m.channel is not None:
        p += [("<|channel|>", True, False), (m.channel, False, False)]
    if m.role == "assistant":
        p += to
    if m.content_type:
        if m.content_type.startswith("<|constrain|>"):
            rest = m.content_type[len("<|constrain|>"):]
            p += [(" ", False, False), ("<|constrain|>", True, False)]
            p += [(rest, False, False)] if rest else []
        else:
            p.append((f" {m.content_type}", False, False))
    p += [("<|message|>", True, False), (m.content, False, False), (end, True, False)]
    return p


def _end_token(m: Message) -> str:
    return "<|call|>" if m.role == "assistant" and m.recipient else "<|end|>"


def _ids(tokenizer: Tokenizer, pieces) -> tuple[list[int], list[bool]]:
    ids, mask = [], []
    for text, special, trainable in pieces:
        new = [tokenizer.token_id(text)] if special else tokenizer.encode(text, allow_special=False)
        ids += new
        mask += [trainable] * len(new)
    return ids, mask


def _prompt_pieces(messages, reasoning_effort, date, developer, system):
    conv = _conversation(messages, reasoning_effort, date, developer, system)
    pieces = [p for m in conv for p in _message_pieces(m, _end_token(m))]
    return pieces + [("<|start|>", True, False), ("assistant", False, False)]


def render_prompt(tokenizer: Tokenizer, messages, *, reasoning_effort: str | None = None,
                  date=None, developer: str | None = None,
                  system: SystemContent | None = None) -> list[int]:
    """Token ids of the prompt, ending in `<|start|>assistant`. `reasoning_effort` is
    low|medium|high (default medium); `date` adds `Current date:` (none by default, so prompts
    are reproducible); `developer` is the developer message's instructions; `system` replaces
    the whole system message (then leave reasoning_effort and date unset)."""
    ids, _ = _ids(tokenizer, _prompt_pieces(messages, reasoning_effort, date, developer, system))
    return ids


def render_prompt_text(messages, *, reasoning_effort: str | None = None, date=None,
                       developer: str | None = None, system: SystemContent | None = None) -> str:
    """The prompt of `render_prompt` as text."""
    pieces = _prompt_pieces(messages, reasoning_effort, date, developer, system)
    return "".join(text for text, _, _ in pieces)


def _training_pieces(messages, reasoning_effort, date, developer, system, train_all_turns):
    conv = _conversation(messages, reasoning_effort, date, developer, system)
    last_user = max((i for i, m in enumerate(conv) if m.role == "user"), default=-1)
    pieces = []
    for i, m in enumerate(conv):
        end = _end_token(m)
        if i == len(conv) - 1 and m.role == "assistant" and m.channel == "final":
            end = "<|return|>"  # harmony's render_conversation_for_training
        trainable = m.role == "assistant" and (train_all_turns or i > last_user)
        # The first assistant message after another author starts with the prompt's
        # `<|start|>assistant`; later ones in the same run are generated whole.
        run_start = i == 0 or conv[i - 1].role != "assistant"
        pieces += [(t, s, trainable and not (run_start and head))
                   for t, s, head in _message_pieces(m, end)]
    if not any(t for _, _, t in pieces):
        raise ValueError("no assistant message to train on: the conversation must have an "
                         "assistant message after its last user message "
                         "(or pass train_all_turns=True)")
    return pieces


def render_training(tokenizer: Tokenizer, messages, *, reasoning_effort: str | None = None,
                    date=None, developer: str | None = None,
                    system: SystemContent | None = None,
                    train_all_turns: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, assistant_mask) of a whole conversation for SFT. The last message, if an
    assistant final, ends in `<|return|>`; answered turns lose their analysis. The mask is True
    on exactly the tokens the model generates after `render_prompt` of the preceding messages:
    the assistant messages after the last user message (all turns' with train_all_turns),
    minus the `<|start|>assistant` that opens each run of assistant messages."""
    pieces = _training_pieces(messages, reasoning_effort, date, developer, system,
                              train_all_turns)
    return _ids(tokenizer, pieces)


def render_training_text(messages, *, reasoning_effort: str | None = None, date=None,
                         developer: str | None = None, system: SystemContent | None = None) -> str:
    """The conversation of `render_training` as text."""
    pieces = _training_pieces(messages, reasoning_effort, date, developer, system, True)
    return "".join(text for text, _, _ in pieces)


# -- parsing ---------------------------------------------------------------------------------

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(n) for n in GPT_OSS_SPECIAL_TOKENS) + ")")
_TURN_STOPS = ("<|return|>", "<|call|>", "<|endoftext|>")


def parse_completion(tokenizer: Tokenizer, completion_ids) -> ParsedCompletion:
    """Parse the tokens sampled after a `render_prompt` prompt. Never raises on odd input:
    stray tokens between messages are skipped, unknown ids decode to nothing."""
    names = {i: n for n, i in tokenizer.special.items()}
    items, run = [], []  # items: (text, is_special); text ids are decoded together
    for i in completion_ids:
        i = int(i)
        if i in names:
            if run:
                items.append((tokenizer.decode(run), False))
                run = []
            items.append((names[i], True))
        else:
            run.append(i)
    if run:
        items.append((tokenizer.decode(run), False))
    return _parse_items(items)


def parse_completion_text(text: str) -> ParsedCompletion:
    """`parse_completion` on text, where the special tokens are spelled out."""
    return _parse_items([(s, i % 2 == 1) for i, s in enumerate(_SPECIAL_RE.split(text)) if s])


def _parse_items(items: list[tuple[str, bool]]) -> ParsedCompletion:
    messages, state, header, content = [], "header", [], []  # the prompt opened a header
    stopped = False
    for text, special in items:
        if state == "between":
            if special and text == "<|start|>":
                state, header = "header", []
            elif special and text in _TURN_STOPS:
                stopped = True
                break
        elif state == "header":
            if special and text == "<|message|>":
                state, content = "content", []
            elif special and text in _TURN_STOPS:
                stopped = True
                break
            elif special and text == "<|start|>":
                header = []
            elif special and text == "<|end|>":
                state = "between"  # a header with no body: drop it
            else:
                header.append(text)
        else:  # content
            if special and text in ("<|end|>", *_TURN_STOPS):
                messages.append(_message("".join(header), "".join(content)))
                state = "between"
                if text != "<|end|>":
                    stopped = True
                    break
            else:
                content.append(text)
    if state == "content" and not stopped:
        messages.append(_message("".join(header), "".join(content)))
    analysis = [m.content for m in messages if m.channel == "analysis"]
    finals = [m.content for m in messages if m.channel == "final"]
    return ParsedCompletion(analysis="\n".join(analysis) if analysis else None,
                            final=finals[-1] if finals else None,
                            messages=messages, truncated=not stopped)


def _message(header: str, content: str) -> Message:
    """Message from a header such as `<|channel|>analysis` (the first message: the prompt
    gave the role), `assistant<|channel|>commentary to=functions.f <|constrain|>json`."""
    role_part, has_channel, channel_part = header.partition("<|channel|>")
    role_words, channel_words = role_part.split(), channel_part.split()
    role = "assistant"
    if role_words and not role_words[0].startswith("to="):
        role = role_words.pop(0)
    channel = channel_words.pop(0) if has_channel and channel_words else None
    recipient, rest = None, []
    for w in role_words + channel_words:
        if w.startswith("to=") and recipient is None:
            recipient = w[3:]
        else:
            rest.append(w)
    return Message(role, content, channel, recipient, " ".join(rest) or None)
