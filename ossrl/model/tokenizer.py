"""The gpt-oss tokenizer (`o200k_harmony`), read from a Hugging Face `tokenizer.json`.

What it is: a small wrapper over the `tokenizers` library (transformers is not needed at run
time) that adds what the harmony chat format needs: encoding with special tokens allowed or
refused, and the harmony special-token ids looked up *by name*.

What it is not: the chat format itself (see `ossrl/model/chat.py`).

The one thing to know: never hard-code a special id. In the real checkpoints `<|start|>` is
200006, but the tiny test checkpoints (see `write_byte_level_tokenizer`) have 512-token
vocabularies, so their special tokens sit right after the 256 byte tokens (`<|start|>` = 264).
Use `tok.start`, `tok.token_id("<|start|>")` or `tok.special[...]`.

    tok = load_tokenizer("path/to/checkpoint")            # a directory or a tokenizer.json
    ids = tok.encode("<|start|>user<|message|>hi<|end|>")  # specials become single ids
    ids = tok.encode(untrusted_text, allow_special=False)  # "<|end|>" stays plain text
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

# The harmony special tokens of gpt-oss, name -> id in the real tokenizer (spec section 4.1).
# The HF tokenizer.json holds exactly these as added tokens (ids 199998..200018).
GPT_OSS_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|reserved_200004|>": 200004,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": 200012,
    "<|reserved_200013|>": 200013,
    "<|reserved_200014|>": 200014,
    "<|reserved_200015|>": 200015,
    "<|reserved_200016|>": 200016,
    "<|reserved_200017|>": 200017,
    "<|endofprompt|>": 200018,
}
FIRST_SPECIAL_ID = 199998  # the number of BPE (byte-level) tokens in o200k_base


class Tokenizer:
    """A `tokenizers.Tokenizer` plus harmony special tokens by name.

    `vocab_size` and `len()` are both the number of ids the tokenizer can produce, added
    tokens included (200019 for gpt-oss; the model's embedding has 201088 rows, the rest are
    unreachable). Note that transformers' `vocab_size` excludes added tokens.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str = "<in memory>"):
        self.source = source
        self._tok = backend
        # A second copy that treats added-token text as ordinary text (tiktoken's
        # encode_ordinary): used for untrusted content, so "<|end|>" cannot end a message.
        # `encode_special_tokens` only covers tokens marked special, so mark them all.
        spec = json.loads(backend.to_str())
        for t in spec.get("added_tokens") or []:
            t["special"] = True
        self._ordinary = tokenizers.Tokenizer.from_str(json.dumps(spec))
        self._ordinary.encode_special_tokens = True
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(added)
        # Every added token, name -> id: for gpt-oss the 21 harmony tokens of spec 4.1.
        self.special: dict[str, int] = {t.content: i for i, t in sorted(added.items())}

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. With `allow_special=False`, special-token text such as
        "<|start|>" is encoded as ordinary text (use it for anything untrusted)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        tok = self._tok if allow_special else self._ordinary
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Text of `ids`. Ids the tokenizer does not know (e.g. embedding rows past the
        tokenizer) decode to nothing; broken UTF-8 decodes to U+FFFD."""
        ids = [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, name: str) -> int:
        """The id of the token spelled `name` (e.g. "<|return|>"); KeyError if absent."""
        i = self._tok.token_to_id(name)
        if i is None:
            raise KeyError(f"token {name!r} is not in the tokenizer {self.source}")
        return i

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- harmony ids, by name ---------------------------------------------------------------

    @property
    def startoftext(self) -> int:
        return self.token_id("<|startoftext|>")

    @property
    def endoftext(self) -> int:
        return self.token_id("<|endoftext|>")

    @property
    def start(self) -> int:
        return self.token_id("<|start|>")

    @property
    def end(self) -> int:
        return self.token_id("<|end|>")

    @property
    def message(self) -> int:
        return self.token_id("<|message|>")

    @property
    def channel(self) -> int:
        return self.token_id("<|channel|>")

    @property
    def constrain(self) -> int:
        return self.token_id("<|constrain|>")

    @property
    def return_(self) -> int:
        return self.token_id("<|return|>")

    @property
    def call(self) -> int:
        return self.token_id("<|call|>")

    # -- sizes ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _tokenizer_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return path


def load_tokenizer(path) -> Tokenizer:
    """Load `tokenizer.json`, or `<dir>/tokenizer.json` when `path` is a directory."""
    file = _tokenizer_file(path)
    text = file.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on a bad schema
        raise ValueError(f"{file} is not a tokenizers tokenizer.json: {e}") from None
    return Tokenizer(backend, source=str(file))


# -- tiny tokenizers for tests and CPU demos --------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer_json() -> dict:
    """A tokenizer.json (as a dict) with the 256 bytes as ids 0..255 (id = byte value, no
    merges) and the 21 harmony special tokens at 256 + (real id - 199998), in the real order."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    added = [
        {"id": 256 + real - FIRST_SPECIAL_ID, "content": name, "single_word": False,
         "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for name, real in GPT_OSS_SPECIAL_TOKENS.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        # No regex split: with no merges it could not change the ids.
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                          "trim_offsets": True, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False,
                    "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def write_byte_level_tokenizer(path_or_dir, *, vocab_size: int | None = None) -> Tokenizer:
    """Write a tiny harmony tokenizer and return it loaded.

    `path_or_dir` ending in `.json` is the tokenizer file itself; anything else is a directory
    (created if needed) that gets `tokenizer.json`, `tokenizer_config.json` and
    `special_tokens_map.json` (what transformers' AutoTokenizer needs: bos `<|startoftext|>`,
    eos `<|return|>`, pad `<|endoftext|>`, as in gpt-oss). `vocab_size`, when given, is the
    model's embedding size and must cover the 277 ids the tokenizer produces.
    """
    data = byte_level_tokenizer_json()
    n_ids = 256 + len(GPT_OSS_SPECIAL_TOKENS)
    if vocab_size is not None and vocab_size < n_ids:
        raise ValueError(f"vocab_size={vocab_size} is too small: the byte-level harmony "
                         f"tokenizer uses ids 0..{n_ids - 1}; use vocab_size >= {n_ids}")
    path = Path(path_or_dir)
    if path.suffix == ".json":
        file = path
        file.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
        file = path / "tokenizer.json"
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>",
                   "pad_token": "<|endoftext|>"}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
                  "clean_up_tokenization_spaces": False, **special}
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    file.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return load_tokenizer(file)
