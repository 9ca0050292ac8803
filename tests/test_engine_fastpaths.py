"""CPU fast paths of the Megatron backend (issue 15): the output layer over the true vocabulary only, and
glibc malloc keeping freed memory. References: megatron's own padded output layer (through
`forward_logits`, which does not take the fast path) and the kernel's minor-fault counter."""

import subprocess
import sys
import textwrap

import torch

from erpd_megatron.bench.models import BenchModel, policy_engine, token_batch


def _tiny_engine(tie: bool):
    # vocab 24 -> megatron pads the output layer to 128 rows
    m = BenchModel(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, ffn_hidden_size=64,
                   vocab_size=24, tie_embeddings=tie)
    return m, policy_engine(m, micro_batch_size=4, lr=1e-3)


def test_output_layer_fast_path_taken_and_equal_to_megatron_padded_layer():
    from erpd_megatron.megatron.cpu_linear import plain_local_linear
    from erpd_megatron.megatron.engine import _seq_first_logits

    for tie in (True, False):
        spec, eng = _tiny_engine(tie)
        gpt = eng.modules[0]
        assert plain_local_linear(gpt.output_layer)
        w = gpt.shared_embedding_or_output_weight() if tie else None
        h = torch.randn(5, 3, spec.hidden_size)
        kw = dict(hidden_states=h, output_layer=gpt.output_layer, output_weight=w, runtime_gather_output=None,
                  scale_logits=lambda x: x)
        fast = _seq_first_logits(**kw, vocab_size=spec.vocab_size)
        full = _seq_first_logits(**kw)
        assert fast.shape[-1] == spec.vocab_size and full.shape[-1] == 128
        torch.testing.assert_close(fast, full[..., :spec.vocab_size], rtol=1e-5, atol=1e-6)

        # the engine's log-probs (fast path) = log_softmax of megatron's own padded logits (forward_logits)
        batch = token_batch(4, 12, spec.vocab_size, ragged=True)
        lp = eng.forward_logprobs(batch)
        logits = eng.forward_logits(batch).double()
        ids = batch["input_ids"]
        ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        ref = torch.cat([ref.new_zeros(4, 1), ref], 1) * batch["attention_mask"]
        torch.testing.assert_close(lp.double(), ref, rtol=0, atol=2e-5)


def test_output_layer_fast_path_gradient_leaves_padding_rows_untouched():
    """The padded rows get no gradient (they are not in the graph); the real rows get the full one."""
    spec, eng = _tiny_engine(tie=False)
    batch = token_batch(4, 12, spec.vocab_size)

    def loss_fn(lp, mb, ent):
        return -(lp * mb["response_mask"]).sum() / mb["response_mask"].sum(), {}

    eng.forward_backward(batch, loss_fn)
    g = eng.modules[0].output_layer.weight.main_grad
    assert g.shape[0] == 128
    assert torch.count_nonzero(g[spec.vocab_size:]) == 0
    assert torch.count_nonzero(g[:spec.vocab_size]) > 0


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """A 64 MiB buffer allocated and freed again: glibc's defaults map fresh pages every time (16,384 minor faults
    per cycle: above the 32 MiB ceiling of its dynamic mmap threshold); with keep_freed_memory(), once the heap has
    grown to hold it (the first rounds), every cycle reuses the heap (no new faults)."""
    code = textwrap.dedent("""
        import resource, torch
        from erpd_megatron.utils.cpu_malloc import keep_freed_memory
        def faults():
            for _ in range(3):  # warm: first uses of this size
                torch.empty(64 << 18).fill_(1.0)
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(8):
                torch.empty(64 << 18).fill_(1.0)
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 8
        before = faults()
        on = keep_freed_memory()
        faults()  # the heap grows to hold the buffer
        print(before, on, faults())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, on, after = out.stdout.split()
    assert on == "True"
    assert float(before) > 10_000  # 64 MiB = 16,384 pages of 4 KiB, mapped afresh each cycle
    assert float(after) < 1_000


def test_keep_freed_memory_off_by_environment():
    code = "from erpd_megatron.utils.cpu_malloc import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "ERPD_CPU_MALLOC": "0"})
    assert out.stdout.strip() == "False"


def test_onednn_linear_values_and_gradients_match_float64():
    """cpu_linear.linear against a float64 reference: forward and the three gradients (x, w, b), N-D input."""
    from erpd_megatron.utils import cpu_gemm as cpu_linear

    assert cpu_linear.onednn_enabled()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 48, generator=g, requires_grad=True)
    w = torch.randn(40, 48, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    gy = torch.randn(7, 3, 40, generator=g)
    y = cpu_linear.linear(x, w, b)
    y.backward(gy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = xd @ wd.t() + bd
    yd.backward(gy.double())
    for got, ref in ((y, yd), (x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_onednn_linear_falls_back_off_cpu_fp32_or_when_disabled(monkeypatch):
    from erpd_megatron.utils import cpu_gemm as cpu_linear

    calls = []
    monkeypatch.setattr(cpu_linear, "_onednn_linear", lambda *a: calls.append(1) or torch.ops.mkldnn._linear_pointwise(
        a[0], a[1], a[2] if len(a) > 2 else None, "none", [], ""))
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(cpu_linear.linear(x, w), torch.nn.functional.linear(x, w)) and not calls  # fp64: F.linear
    cpu_linear.linear(x.float(), w.float())
    assert calls == [1]
    monkeypatch.setenv("ERPD_CPU_ONEDNN", "0")
    cpu_linear.linear(x.float(), w.float())
    assert calls == [1]


def test_engine_layers_take_the_onednn_path(monkeypatch):
    """Every linear layer of the built model (QKV, attention output, fc1, fc2 per layer) and the output layer run
    on oneDNN in a forward pass; the log-probs stay those of megatron's own path (ERPD_CPU_ONEDNN=0)."""
    from erpd_megatron.megatron import cpu_linear
    from erpd_megatron.utils import cpu_gemm

    spec, eng = _tiny_engine(tie=True)
    layers = [m for m in eng.modules[0].modules()
              if isinstance(m, (cpu_linear.CPUColumnParallelLinear, cpu_linear.CPURowParallelLinear))]
    assert len(layers) == 4 * spec.num_layers
    batch = token_batch(4, 12, spec.vocab_size, ragged=True)
    calls = []
    real = cpu_gemm._onednn_linear
    monkeypatch.setattr(cpu_gemm, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    lp = eng.forward_logprobs(batch)
    assert len(calls) == 4 * spec.num_layers + 1
    monkeypatch.setenv("ERPD_CPU_ONEDNN", "0")
    ref = eng.forward_logprobs(batch)
    assert len(calls) == 4 * spec.num_layers + 1  # no oneDNN call with it off
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)


def test_use_onednn_linears_routes_a_transformers_model():
    """The rollout engine's transformers model: every nn.Linear goes through oneDNN, logits equal to fp32 rounding."""
    from erpd_megatron.bench.models import hf_model
    from erpd_megatron.utils import cpu_gemm

    spec = BenchModel(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, ffn_hidden_size=64,
                      vocab_size=40)
    model = hf_model(spec).eval()
    ids = token_batch(3, 10, spec.vocab_size)["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        n = cpu_gemm.use_onednn_linears(model)
        assert n == 7 * spec.num_layers + 1  # q, k, v, o, gate, up, down per layer + lm_head
        assert cpu_gemm.use_onednn_linears(model) == 0  # idempotent
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_local_engine_on_cpu_routes_its_linears():
    from erpd_megatron.bench.models import hf_model
    from erpd_megatron.rollout.local_engine import LocalEngine

    spec = BenchModel(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, ffn_hidden_size=64,
                      vocab_size=40)
    eng = LocalEngine(hf_model(spec), eos_token_ids=[0])
    linears = [m for m in eng.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(getattr(m, "_erpd_onednn", False) for m in linears)
