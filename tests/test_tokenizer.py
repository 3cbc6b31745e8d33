"""Tokenizer: loading, errors, special ids by name, and agreement with transformers."""

import json
import random

import pytest

from ossrl.model.tokenizer import (
    FIRST_SPECIAL_ID,
    GPT_OSS_SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    write_byte_level_tokenizer,
)

HARMONY_TEXT = (
    "<|start|>user<|message|>Grüße, 世界! 🌍\n\ttabs  and  spaces<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>think<|end|>"
    "<|start|>assistant<|channel|>final<|message|>ok<|return|>"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    write_byte_level_tokenizer(d, vocab_size=512)
    return d


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def test_special_tokens_sit_after_bytes_in_real_order(tok):
    assert len(GPT_OSS_SPECIAL_TOKENS) == 21
    for name, real_id in GPT_OSS_SPECIAL_TOKENS.items():
        assert tok.token_id(name) == 256 + real_id - FIRST_SPECIAL_ID
    tiny_ids = {n: 256 + r - FIRST_SPECIAL_ID for n, r in GPT_OSS_SPECIAL_TOKENS.items()}
    assert tok.special == tiny_ids
    assert tok.token_id("<|endofprompt|>") == 276
    assert (tok.startoftext, tok.endoftext, tok.return_, tok.constrain, tok.channel) == (
        256, 257, 260, 261, 263)
    assert (tok.start, tok.end, tok.message, tok.call) == (264, 265, 266, 270)
    assert tok.vocab_size == len(tok) == 277


def test_unicode_round_trips_exactly(tok):
    rng = random.Random(0)
    samples = ["", " ", "a", "\x00\x01", "héllo wörld", "日本語のテキスト", "🤖👩‍👩‍👧",
               "  leading and trailing  ", "line\r\nbreak", "\ufeffbom", "Ω≈ç√∫"]
    for _ in range(200):
        n = rng.randrange(0, 30)
        codepoints = [rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD800),
                                  rng.randrange(0xE000, 0x110000)]) for _ in range(n)]
        samples.append("".join(map(chr, codepoints)))
    for s in samples:
        for allow in (True, False):
            ids = tok.encode(s, allow_special=allow)
            assert tok.decode(ids) == s
            assert all(0 <= i < 256 for i in ids)  # byte tokens only
            assert len(ids) == len(s.encode("utf-8"))


def test_special_text_encodes_to_single_ids_only_when_allowed(tok):
    assert tok.encode("<|start|>user<|message|>") == [tok.start, *b"user", tok.message]
    plain = tok.encode("<|start|>user<|message|>", allow_special=False)
    assert plain == list(b"<|start|>user<|message|>")
    assert not any(tok.is_special(i) for i in plain)


def test_decode_keeps_or_skips_special_tokens(tok):
    ids = tok.encode(HARMONY_TEXT)
    assert tok.decode(ids) == HARMONY_TEXT
    assert "<|" not in tok.decode(ids, skip_special=True)


def test_decode_never_raises_on_unknown_ids_or_broken_utf8(tok):
    assert tok.decode([10_000, 200_500, *b"ok"]) == "ok"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character


def test_token_id_of_missing_token_names_token_and_file(tok, tiny_dir):
    with pytest.raises(KeyError) as e:
        tok.token_id("<|nope|>")
    assert "<|nope|>" in str(e.value) and str(tiny_dir / "tokenizer.json") in str(e.value)


def test_load_accepts_directory_or_file(tiny_dir):
    a = load_tokenizer(tiny_dir)
    b = load_tokenizer(tiny_dir / "tokenizer.json")
    assert a.encode(HARMONY_TEXT) == b.encode(HARMONY_TEXT)


def test_missing_file_raises_file_not_found_naming_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_tokenizer(tmp_path / "nothere")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json


def test_malformed_json_raises_value_error_naming_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(bad)


def test_write_to_json_path_and_vocab_size_check(tmp_path):
    t = write_byte_level_tokenizer(tmp_path / "sub" / "tok.json")
    assert isinstance(t, Tokenizer) and t.start == 264
    with pytest.raises(ValueError, match="vocab_size"):
        write_byte_level_tokenizer(tmp_path / "small", vocab_size=256)


def test_specials_not_marked_special_still_cannot_be_injected(tmp_path):
    write_byte_level_tokenizer(tmp_path / "a.json")
    data = json.loads((tmp_path / "a.json").read_text())
    for t in data["added_tokens"]:
        t["special"] = False
    (tmp_path / "b.json").write_text(json.dumps(data))
    tok = load_tokenizer(tmp_path / "b.json")
    assert tok.encode("<|end|>") == [tok.end]
    assert tok.encode("<|end|>", allow_special=False) == list(b"<|end|>")


def test_transformers_fast_tokenizer_encodes_the_same_ids(tok, tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    ids = tok.encode(HARMONY_TEXT)
    assert hf.encode(HARMONY_TEXT, add_special_tokens=True) == ids
    assert hf.decode(ids) == tok.decode(ids) == HARMONY_TEXT
    assert hf.convert_tokens_to_ids("<|call|>") == tok.call


def test_transformers_auto_tokenizer_loads_directory_with_gpt_oss_roles(tok, tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    assert hf.encode(HARMONY_TEXT) == tok.encode(HARMONY_TEXT)
    assert hf.bos_token_id == tok.startoftext
    assert hf.eos_token_id == tok.return_
    assert hf.pad_token_id == tok.endoftext
    assert len(hf) == len(tok)


def test_lazy_top_level_export():
    import ossrl

    assert ossrl.load_tokenizer is load_tokenizer
