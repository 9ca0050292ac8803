"""Model families that need modules beyond megatron-core's stock GPT layers (Qwen3.5 hybrid)."""
