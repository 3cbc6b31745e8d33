"""Tiny checkpoints load in ossrl and transformers; naive decoding and the `ossrl generate` CLI."""

import json

import pytest
import torch

import ossrl
from ossrl.cli import main
from ossrl.engine.naive import generate_naive
from ossrl.model.chat import assistant_stop_token_ids, render_prompt
from ossrl.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0, mxfp4=True)


def test_tiny_checkpoint_is_a_complete_hf_directory_transformers_loads(tiny):
    transformers = pytest.importorskip("transformers")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny / name).is_file(), name
    tok = ossrl.load_tokenizer(tiny)
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.return_, tok.endoftext, tok.call]
    hf = transformers.GptOssForCausalLM.from_pretrained(
        tiny, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).float().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny)
    ours = ossrl.load_model(tiny, dtype=torch.float32)
    ids = render_prompt(tok, "hello", reasoning_effort="low")
    assert hf_tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert ((a - b).norm() / b.norm()).item() <= 1e-4


def test_greedy_naive_decoding_equals_argmax_of_full_forward(tiny):
    model = ossrl.load_model(tiny, dtype=torch.float32)
    prompt = [5, 17, 99, 3, 250, 7, 7, 42, 1, 2, 3]  # longer than the sliding window (8)
    out = generate_naive(model, prompt, max_new_tokens=12, temperature=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[len(prompt):]
    assert out.finish_reason == "length"
    # The returned log-probs are the model's own log-probs of the tokens.
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq]))[0, len(prompt) - 1:-1], -1)
    expected = logp[torch.arange(12), torch.tensor(out.token_ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=1e-4, atol=1e-4)


def test_decoding_stops_at_stop_tokens_and_is_seeded(tiny):
    model = ossrl.load_model(tiny, dtype=torch.float32)
    tok = ossrl.load_tokenizer(tiny)
    prompt = render_prompt(tok, "hi")
    a = generate_naive(model, prompt, max_new_tokens=30, seed=3)
    b = generate_naive(model, prompt, max_new_tokens=30, seed=3)
    assert a.token_ids == b.token_ids
    stop = a.token_ids[4]
    c = generate_naive(model, prompt, max_new_tokens=30, seed=3, stop_token_ids=[stop])
    first = a.token_ids.index(stop)
    assert c.token_ids == a.token_ids[: first + 1] and c.finish_reason == "stop"
    assert tok.end not in assistant_stop_token_ids(tok)


def test_generate_cli_prints_a_completion(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "--max-new-tokens", "8", "--device", "cpu", "Hi"]) == 0
    out = capsys.readouterr().out
    assert out.strip()


def test_generate_cli_reports_a_missing_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "Hi"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
