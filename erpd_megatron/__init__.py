"""erpd-megatron: Extreme Region Policy Distillation on megatron-core.

Heavy imports (torch, megatron) are lazy so that `erpd --help` stays fast.
"""

__version__ = "0.1.0"
