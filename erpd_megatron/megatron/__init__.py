"""megatron-core backend: parallel layout, model provider, log-probs, PolicyEngine, checkpoints.

Import the submodules directly (`from erpd_megatron.megatron.engine import PolicyEngine`); this
package import stays light (no megatron import here).
"""
