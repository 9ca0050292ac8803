"""Qwen3.5 hybrid text model (Gated DeltaNet + gated full attention) as megatron-core modules.

Portable (pure torch) so it runs on CPU over gloo; on GPU the flash-linear-attention kernels are used
when importable. Entry point for the model builder: `spec.qwen35_block_spec`.
"""
