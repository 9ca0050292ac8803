"""Literal Hugging Face configs of the models the launcher recipes train (shared by the planner and
`launchers/`; the planner imports nothing from the launchers).

These are the `config.json` fields of the released checkpoints that matter for memory, FLOPs and layout
checks (the planner reads them; nothing here downloads anything). Tokenizer ids and generation settings
are left out on purpose: they do not change the arithmetic.

Qwen3.5-27B is stored in its released composite layout (`Qwen3_5ForConditionalGeneration` with a
`text_config`); the planner models the text decoder only. Not counted: the vision tower (27 layers) and
the 1 MTP layer, which the ERPD trainer neither trains nor runs (they survive conversion untouched).
"""

from __future__ import annotations

import copy

# the CPU demo's tiny Qwen3 (DESIGN.md section 6: 3 layers, hidden 128, 4 heads / 2 KV, MLP 384, tied)
QWEN3_TOY: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 32,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}

QWEN3_1_7B: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

QWEN3_4B: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

LLAMA_3_2_3B: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

# the shapes of NeMo-RL's published GRPO performance recipes (docs/planner.md, "Against published RL figures")
LLAMA_3_1_8B: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

QWEN3_32B: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_hidden_layers": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# [GDN, GDN, GDN, full] x 16
_QWEN35_27B_LAYER_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 16

QWEN3_5_27B: dict = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_5_text",
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 64,
        "layer_types": _QWEN35_27B_LAYER_TYPES,
        "full_attention_interval": 4,
        # gated full attention: q_proj rows per head = [query 256, gate 256]
        "num_attention_heads": 24,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "attn_output_gate": True,
        # Gated DeltaNet (linear attention) layers
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 48,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "vocab_size": 248320,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
        "mtp_num_hidden_layers": 1,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    "vision_config": {"model_type": "qwen3_5_vision", "depth": 27},
}

#: name -> HF config dict (names are what `erpd plan --model` and the recipes take)
MODELS: dict[str, dict] = {
    "qwen3-toy": QWEN3_TOY,
    "qwen3-1.7b": QWEN3_1_7B,
    "qwen3-4b": QWEN3_4B,
    "llama-3.2-3b": LLAMA_3_2_3B,
    "llama-3.1-8b": LLAMA_3_1_8B,
    "qwen3-32b": QWEN3_32B,
    "qwen3.5-27b": QWEN3_5_27B,
}


def get_model_config(name: str) -> dict:
    """A deep copy of the embedded HF config `name` (KeyError lists the known names)."""
    try:
        return copy.deepcopy(MODELS[name])
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def load_hf_config(path: str) -> dict:
    """An HF config.json, given as the file or as the model directory holding it; ValueError (one line) when it is
    missing or not a JSON object."""
    import json
    import os

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file" if file == path else f"{path}: no config.json in it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: not a JSON config (top level is {type(data).__name__})")
    return data


def resolve_model_config(spec: str) -> dict:
    """The HF config of `spec`: an embedded model's name, else a config.json or a model directory."""
    import os

    if spec in MODELS:
        return get_model_config(spec)
    if os.sep in spec or os.path.exists(spec) or spec.endswith(".json"):
        return load_hf_config(spec)
    return get_model_config(spec)  # KeyError naming the known models
