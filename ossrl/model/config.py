"""gpt-oss configuration: the fields of a Hugging Face `config.json`, validated.

`GptOssConfig.from_hf_dict` reads both the transformers 4.x form (top-level `rope_theta` and
`rope_scaling`) and the 5.x form (`rope_parameters`); `to_hf_dict` writes a config that both
transformers versions load. Every bad value raises `ConfigError` naming the file and the field.
Presets: `GptOssConfig.gpt_oss_20b()` and `GptOssConfig.gpt_oss_120b()` (spec section 1.1).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json (or a config value) that cannot describe a gpt-oss model."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


@dataclass
class YarnRope:
    """YaRN RoPE parameters (spec 2.3). `truncate` must be False for gpt-oss."""

    theta: float = 150000.0
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False


@dataclass
class GptOssConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    rope: YarnRope = field(default_factory=YarnRope)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.9
    initializer_range: float = 0.02
    eos_token_id: int | list[int] | None = 200002
    pad_token_id: int | None = 199999
    bos_token_id: int | None = 199998
    # Expert storage in the checkpoint: "mxfp4" when config.json has an mxfp4 quantization_config.
    quantization: str | None = None

    def __post_init__(self):
        if not self.layer_types:
            # Even layers slide, odd layers see everything (spec 1.1; layer 0 slides).
            self.layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)]
        self.validate()

    # ----------------------------------------------------------------- presets
    @classmethod
    def gpt_oss_20b(cls, **overrides) -> GptOssConfig:
        return cls(**{"num_hidden_layers": 24, "num_local_experts": 32, "quantization": "mxfp4", **overrides})

    @classmethod
    def gpt_oss_120b(cls, **overrides) -> GptOssConfig:
        return cls(**{"num_hidden_layers": 36, "num_local_experts": 128, "quantization": "mxfp4", **overrides})

    # ---------------------------------------------------------------- validation
    def validate(self, source: str = "config") -> None:
        def fail(name: str, why: str):
            detail = f"field '{name}' {why}"
            raise ConfigError(f"{source}: {detail}", detail)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                     "num_experts_per_tok", "sliding_window", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                 f"({self.num_attention_heads})")
        if self.head_dim % 2:
            fail("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            fail("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds num_local_experts "
                 f"({self.num_local_experts})")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                fail("layer_types", f"entry {i} is {kind!r}; expected {SLIDING!r} or {FULL!r}")
        for name in ("rms_norm_eps", "swiglu_limit", "swiglu_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                fail(name, f"must be a positive finite number, got {value!r}")
        r = self.rope
        if not (isinstance(r.theta, (int, float)) and r.theta > 1):
            fail("rope_theta", f"must be a number > 1, got {r.theta!r}")
        if not (isinstance(r.factor, (int, float)) and r.factor >= 1):
            fail("rope_scaling.factor", f"must be a number >= 1, got {r.factor!r}")
        if not (isinstance(r.original_max_position_embeddings, int) and r.original_max_position_embeddings > 0):
            fail("rope_scaling.original_max_position_embeddings",
                 f"must be a positive integer, got {r.original_max_position_embeddings!r}")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "is true; gpt-oss has a separate lm_head")
        if not self.attention_bias:
            fail("attention_bias", "is false; gpt-oss attention projections have biases")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for token in value if isinstance(value, list) else [value]:
                if token is not None and not (isinstance(token, int) and 0 <= token < self.vocab_size):
                    fail(name, f"({token!r}) must be a token id below vocab_size ({self.vocab_size})")
        if self.quantization not in (None, "mxfp4"):
            fail("quantization_config.quant_method", f"is {self.quantization!r}; only 'mxfp4' is supported")
        if self.quantization == "mxfp4":
            for name in ("hidden_size", "intermediate_size"):
                if getattr(self, name) % 32:
                    fail(name, f"({getattr(self, name)}) must be a multiple of 32 for MXFP4 experts")

    # ----------------------------------------------------------------- derived
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer_idx: int) -> int | None:
        """Keys visible to a query on this layer, itself included; None for full attention."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    # -------------------------------------------------------------- HF json io
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> GptOssConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "gpt_oss")
        if model_type != "gpt_oss":
            raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; expected 'gpt_oss'")

        rope_fields = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope_fields, dict):
            raise ConfigError(f"{source}: field 'rope_scaling'/'rope_parameters' must be an object")
        rope_type = rope_fields.get("rope_type", rope_fields.get("type", "yarn"))
        if rope_type != "yarn":
            raise ConfigError(f"{source}: field 'rope_type' is {rope_type!r}; gpt-oss uses 'yarn'")
        theta = rope_fields.get("rope_theta", d.get("rope_theta", 150000.0))
        rope = YarnRope(
            theta=theta,
            factor=rope_fields.get("factor", 32.0),
            beta_fast=rope_fields.get("beta_fast") or 32.0,
            beta_slow=rope_fields.get("beta_slow") or 1.0,
            original_max_position_embeddings=rope_fields.get("original_max_position_embeddings", 4096),
            # HF's default when the key is missing is truncate=True (spec 5.3); respect the file.
            truncate=rope_fields.get("truncate", True),
        )

        quant = d.get("quantization_config")
        quantization = None
        if quant is not None:
            if not isinstance(quant, dict):
                raise ConfigError(f"{source}: field 'quantization_config' must be an object")
            quantization = quant.get("quant_method")

        known = {f.name for f in dataclasses.fields(cls)} - {"rope", "quantization"}
        token_fields = {"eos_token_id", "pad_token_id", "bos_token_id"}  # null is meaningful for these
        kwargs = {k: d[k] for k in known if k in d and (d[k] is not None or k in token_fields)}
        if "num_local_experts" not in kwargs and "num_experts" in d:
            kwargs["num_local_experts"] = d["num_experts"]
        if "head_dim" not in kwargs and "hidden_size" in d and "num_attention_heads" in d:
            kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        for name in ("swiglu_limit", "swiglu_alpha", "rms_norm_eps"):
            if name in kwargs and isinstance(kwargs[name], int) and not isinstance(kwargs[name], bool):
                kwargs[name] = float(kwargs[name])
        if "layer_types" in kwargs and not isinstance(kwargs["layer_types"], list):
            raise ConfigError(f"{source}: field 'layer_types' must be a list")
        try:
            config = cls(**kwargs, rope=rope, quantization=quantization)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e.detail}") from None
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: a field has the wrong type ({e})") from None
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> GptOssConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """A config.json both transformers 4.55+ and 5.x read (4.x keys; 5.x converts them)."""
        d = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope.theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope.factor,
                "beta_fast": self.rope.beta_fast,
                "beta_slow": self.rope.beta_slow,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
                "truncate": self.rope.truncate,
            },
            "initial_context_length": self.rope.original_max_position_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "output_router_logits": False,
            "initializer_range": self.initializer_range,
            "use_cache": True,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
        }
        if self.swiglu_alpha != 1.702:
            d["swiglu_alpha"] = self.swiglu_alpha
        if self.quantization == "mxfp4":
            d["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            }
        return d
