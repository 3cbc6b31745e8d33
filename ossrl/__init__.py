"""ossrl: reinforcement learning (GRPO) for OpenAI's gpt-oss models.

The top-level names are imported lazily so that `import ossrl` stays cheap and the
sandbox (standard library only) can be used without importing torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("ossrl.model.loading", "load_model"),
    "GptOssConfig": ("ossrl.model.config", "GptOssConfig"),
    "GptOssForCausalLM": ("ossrl.model.gptoss", "GptOssForCausalLM"),
    "load_tokenizer": ("ossrl.model.tokenizer", "load_tokenizer"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ossrl' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
