"""Qwen3.5 hybrid <-> Megatron names (erpd_megatron.models.qwen35 modules). `{p}` is the HF text prefix:
"model." (Qwen3_5ForCausalLM) or "model.language_model." (Qwen3_5ForConditionalGeneration).

Norm weights are stored as in HF (zero-centred (1 + w) semantics on both sides; GDN out_norm plain w on both
sides), so every conversion is exact. `model.visual.*` and `mtp.*` are not in these tables: they pass through.
"""

GLOBAL = {
    "embedding.word_embeddings.weight": ("vocab", ["{p}embed_tokens.weight"]),
    "decoder.final_layernorm.weight": ("copy", ["{p}norm.weight"]),
    "output_layer.weight": ("vocab", ["lm_head.weight"]),
}

MLP = {
    "input_layernorm.weight": ("copy", ["input_layernorm.weight"]),
    "pre_mlp_layernorm.weight": ("copy", ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.weight": ("gate_up", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
    "mlp.linear_fc2.weight": ("copy", ["mlp.down_proj.weight"]),
}

FULL_ATTENTION = {
    # q_proj rows per head are [query, gate]: Megatron rows per query group [q heads, gate heads, k, v]
    "self_attention.linear_qkv.weight": ("qkv_gated", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                       "self_attn.v_proj.weight"]),
    "self_attention.q_layernorm.weight": ("copy", ["self_attn.q_norm.weight"]),
    "self_attention.k_layernorm.weight": ("copy", ["self_attn.k_norm.weight"]),
    "self_attention.linear_proj.weight": ("copy", ["self_attn.o_proj.weight"]),
    **MLP,
}

LINEAR_ATTENTION = {
    # full (TP=1) in_proj = [in_proj_qkv (= Q, K, V); Z; B; A]; TP ranks hold their block of each section
    "self_attention.in_proj.weight": ("cat", ["linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight",
                                              "linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"]),
    "self_attention.conv1d.weight": ("copy", ["linear_attn.conv1d.weight"]),
    "self_attention.A_log": ("copy", ["linear_attn.A_log"]),
    "self_attention.dt_bias": ("copy", ["linear_attn.dt_bias"]),
    "self_attention.out_norm.weight": ("copy", ["linear_attn.norm.weight"]),
    "self_attention.out_proj.weight": ("copy", ["linear_attn.out_proj.weight"]),
    **MLP,
}


def layer_table(cfg, i: int) -> dict:
    return FULL_ATTENTION if cfg.layer_types[i] == "full_attention" else LINEAR_ATTENTION
