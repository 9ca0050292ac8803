"""LlamaForCausalLM <-> Megatron (local spec) names: as Qwen3 without q/k norms."""

GLOBAL = {
    "embedding.word_embeddings.weight": ("vocab", ["{p}embed_tokens.weight"]),
    "decoder.final_layernorm.weight": ("copy", ["{p}norm.weight"]),
    "output_layer.weight": ("vocab", ["lm_head.weight"]),  # absent when tie_word_embeddings
}

LAYER = {
    "input_layernorm.weight": ("copy", ["input_layernorm.weight"]),
    "self_attention.linear_qkv.weight": ("qkv", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight"]),
    "self_attention.linear_proj.weight": ("copy", ["self_attn.o_proj.weight"]),
    "pre_mlp_layernorm.weight": ("copy", ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.weight": ("gate_up", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
    "mlp.linear_fc2.weight": ("copy", ["mlp.down_proj.weight"]),
}


def layer_table(cfg, i: int) -> dict:
    return LAYER
