"""What the converters need to know about a model, read from its HF config.json (no transformers import).

Families: "qwen3" (Qwen3ForCausalLM), "llama" (LlamaForCausalLM), "qwen3_5" (Qwen3_5ForCausalLM /
`qwen3_5_text`, and the released Qwen3_5ForConditionalGeneration whose text weights live under
`model.language_model.` and whose `model.visual.*` / `mtp.*` tensors pass through unchanged).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ConversionError(ValueError):
    """Bad input for a conversion: message names the file / tensor / field at fault."""


class UnsupportedArchitecture(ConversionError):
    pass


# architecture name -> (family, prefix of the text model's tensors)
ARCHITECTURES = {
    "Qwen3ForCausalLM": ("qwen3", "model."),
    "LlamaForCausalLM": ("llama", "model."),
    "Qwen3_5ForCausalLM": ("qwen3_5", "model."),
    "Qwen3_5ForConditionalGeneration": ("qwen3_5", "model.language_model."),
}
MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen3_5_text": "Qwen3_5ForCausalLM",
               "qwen3_5": "Qwen3_5ForConditionalGeneration"}
# HF tensors outside the text model that we carry unchanged (vision tower, multi-token prediction head)
PASSTHROUGH_PREFIXES = {"qwen3_5": ("model.visual.", "mtp.")}


@dataclass(frozen=True)
class ConvConfig:
    family: str
    architecture: str
    prefix: str  # HF prefix of the text model: "model." or "model.language_model."
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    layer_types: tuple[str, ...] | None = None  # qwen3_5 only: "linear_attention" | "full_attention"
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    attention_output_gate: bool = False
    padded_vocab_size: int = 0  # rows of the Megatron embedding / output layer (>= vocab_size)

    @property
    def passthrough_prefixes(self) -> tuple[str, ...]:
        return PASSTHROUGH_PREFIXES.get(self.family, ()) if self.prefix != "model." else ()

    @classmethod
    def from_hf(cls, config: dict, padded_vocab_size: int | None = None) -> ConvConfig:
        archs = config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), "")]
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedArchitecture(
                f"unsupported architecture {archs} (model_type={config.get('model_type')!r}); "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        family, prefix = ARCHITECTURES[arch]
        text = config.get("text_config", config) if family == "qwen3_5" else config
        if not isinstance(text, dict):
            raise ConversionError(f"config.json: text_config of {arch} must be an object")
        try:
            n_heads = text["num_attention_heads"]
            kw = dict(
                family=family, architecture=arch, prefix=prefix,
                num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"], num_heads=n_heads,
                num_kv_heads=text.get("num_key_value_heads") or n_heads,
                head_dim=text.get("head_dim") or text["hidden_size"] // n_heads,
                ffn_hidden_size=text["intermediate_size"], vocab_size=text["vocab_size"],
                tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            )
        except KeyError as e:
            raise ConversionError(f"config.json: missing field {e.args[0]!r} for {arch}") from None
        if text.get("attention_bias") or text.get("mlp_bias"):
            raise UnsupportedArchitecture(f"{arch} with attention_bias/mlp_bias is not supported")
        if family == "qwen3_5":
            types = text.get("layer_types")
            if types is None:
                interval = text.get("full_attention_interval", 4)
                types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                         for i in range(kw["num_layers"])]
            if len(types) != kw["num_layers"] or set(types) - {"full_attention", "linear_attention"}:
                raise ConversionError(f"config.json: bad layer_types {types} for {kw['num_layers']} layers")
            kw.update(
                layer_types=tuple(types), attention_output_gate=True,
                linear_num_key_heads=text.get("linear_num_key_heads", 16),
                linear_num_value_heads=text.get("linear_num_value_heads", 32),
                linear_key_head_dim=text.get("linear_key_head_dim", 128),
                linear_value_head_dim=text.get("linear_value_head_dim", 128),
                linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
            )
        kw["padded_vocab_size"] = padded_vocab_size or kw["vocab_size"]
        return cls(**kw)

    def with_padded_vocab(self, padded_vocab_size: int) -> ConvConfig:
        if padded_vocab_size < self.vocab_size:
            raise ConversionError(f"padded vocab {padded_vocab_size} < vocab_size {self.vocab_size}")
        return dataclasses.replace(self, padded_vocab_size=padded_vocab_size)

    def check_tp(self, tp: int) -> None:
        """Refuse a TP size that cannot split the heads (message names the field)."""
        if tp < 1:
            raise ConversionError(f"tensor parallel size must be >= 1, got {tp}")
        checks = [("num_attention_heads", self.num_heads), ("intermediate_size", self.ffn_hidden_size)]
        if self.num_kv_heads >= tp:
            checks.append(("num_key_value_heads", self.num_kv_heads))
        if self.family == "qwen3_5":
            checks += [("linear_num_key_heads", self.linear_num_key_heads),
                       ("linear_num_value_heads", self.linear_num_value_heads)]
        for field, value in checks:
            if value % tp:
                raise ConversionError(f"TP={tp} does not divide {field}={value}")
        if self.num_kv_heads < tp and tp % self.num_kv_heads:
            raise ConversionError(f"TP={tp} must be a multiple of num_key_value_heads={self.num_kv_heads} when larger")


def padded_vocab(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's rule: pad to a multiple of divisible_by * TP."""
    m = divisible_by * tp
    return -(-vocab_size // m) * m
