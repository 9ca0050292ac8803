"""A CPU stand-in for Transformer Engine's FusedAdam (transformer_engine/pytorch/optimizers/fused_adam.py), the
optimizer megatron-core 0.19.2 builds whenever TE is importable, in the respects our checkpoints and engine reuse
depend on (not a test module itself; tests/test_fused_adam.py installs it in place of megatron's Adam):

- the step count lives in the param group: `group["step"]`, absent until the first step, then +1 per step for every
  group with params; the per-parameter state holds `exp_avg` and `exp_avg_sq` only (made zero on a param's first
  step) and the bias correction reads the group's step;
- state_dict() looks up a dtype for every per-parameter state key in `name_to_dtype_map` (exp_avg, exp_avg_sq,
  master_param): any other key, e.g. a per-parameter `step`, is a KeyError, as in TE's get_unscaled_state;
- load_state_dict() rebuilds each parameter's state key by key through the same map (TE's set_scaled_state), skipping
  None values; the group keys (its `step` included) come from the loaded param groups;
- the constructor takes megatron's keyword arguments (adam_w_mode, capturable, bias_correction).
The update is Adam(W) in plain torch ops (TE runs one fused CUDA kernel; the values are not meant to be bit-equal).
"""

from __future__ import annotations

import torch


class FusedAdamStandIn(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, capturable=False, master_weights=False, **unused):
        if amsgrad or capturable or master_weights:
            raise RuntimeError("FusedAdamStandIn: amsgrad / capturable / master_weights are not modelled")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_param": torch.float32}

    def _unscaled(self, name: str, t: torch.Tensor) -> torch.Tensor:
        dtype = self.name_to_dtype_map[name]  # KeyError for a key without a dtype, as TE's get_unscaled_state
        assert t.dtype == dtype, (name, t.dtype)
        return t

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {k: {name: self._unscaled(name, t) for name, t in v.items()} for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        by_id = dict(zip((i for g in state_dict["param_groups"] for i in g["params"]),
                         (p for g in self.param_groups for p in g["params"])))
        for k, v in state_dict["state"].items():
            if k in by_id:
                p = by_id[k]
                self.state[p] = {}
                for name, t in v.items():
                    if t is None:
                        continue
                    self.state[p][name] = self._unscaled(name, t.float().clone())

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            group["step"] = group.get("step", 0) + 1
            t, (beta1, beta2) = group["step"], group["betas"]
            bc1 = 1 - beta1 ** t if group["bias_correction"] else 1.0
            bc2 = 1 - beta2 ** t if group["bias_correction"] else 1.0
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                g = p.grad.float()
                if wd and not self.adam_w_mode:
                    g = g + wd * p.float()
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (st["exp_avg"] / bc1) / ((st["exp_avg_sq"] / bc2).sqrt() + eps)
                if wd and self.adam_w_mode:
                    update = update + wd * p.float()
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


def install() -> None:
    """Make megatron-core 0.19.2 build and checkpoint its Adam as it does with TE installed (in this process): the
    optimizer class (optimizer/__init__.py:13-17) and the DistributedOptimizer's TE flags (distrib_optimizer.py:20-26).
    Call before the first engine is built (compat.apply_mcore_fixes, run by init_parallel, then sees TE as present
    and leaves megatron's torch-Adam paths unpatched, as on a GPU with TE)."""
    import megatron.core.optimizer as mopt
    from megatron.core.optimizer import distrib_optimizer as dopt

    mopt.Adam, mopt.USING_PYTORCH_OPTIMIZER = FusedAdamStandIn, False
    dopt.Adam, dopt.HAVE_APEX_OR_TE, dopt.USING_TE_OPTIMIZER = FusedAdamStandIn, True, True
