"""LocalEngine on a tiny random Qwen3 (transformers, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from erpd_megatron.rollout.engine import SamplingParams
from erpd_megatron.rollout.local_engine import LocalEngine, WeightUpdateError

torch.set_num_threads(1)
V = 24  # the toy tokenizer's vocabulary
PROMPTS = [[1, 4, 9, 10, 11, 5], [1, 4, 12, 5], [1, 4, 13, 14, 15, 16, 17, 18, 5]]


def make_model(seed=0):
    cfg = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper, less uniform distributions than the default init
        model.lm_head.weight.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def engine():
    from erpd_megatron.toy.tokenizer import build_tokenizer

    return LocalEngine(make_model(), build_tokenizer(), eos_token_ids=(), max_batch_size=64)


def reference_logprobs(model, prompt, response, temperature):
    """Float64 log-probs of each response token from one full forward over prompt + response (no cache)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    z = logits[len(prompt) - 1:-1] / (temperature if temperature > 0 else 1.0)
    picked = z[torch.arange(len(response)), torch.tensor(response)]
    return (picked - torch.logsumexp(z, dim=-1)).tolist()


@pytest.mark.parametrize("sampling", [
    SamplingParams(n=3, temperature=0.7, max_new_tokens=10, seed=1),
    SamplingParams(n=2, temperature=1.3, top_p=0.8, top_k=6, max_new_tokens=10, seed=2),
    SamplingParams(n=1, temperature=0.0, max_new_tokens=10),
])
def test_behaviour_logprobs_equal_a_separate_forward(engine, sampling):
    samples = engine.generate(PROMPTS, sampling)
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(3) for j in range(sampling.n)]
    for s in samples:
        ref = reference_logprobs(engine.model, PROMPTS[s.prompt_index], s.response_ids, sampling.temperature)
        assert s.logprobs == pytest.approx(ref, abs=2e-5)
        assert s.finish_reason == "length" and len(s.response_ids) == sampling.max_new_tokens


def test_seeds_reproduce_and_do_not_depend_on_batching(engine):
    sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=123)
    a = engine.generate(PROMPTS, sp)
    b = LocalEngine(engine.model, engine.tokenizer, eos_token_ids=(), max_batch_size=1).generate(PROMPTS, sp)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert sum([s.logprobs for s in a], []) == pytest.approx(sum([s.logprobs for s in b], []), abs=2e-5)
    c = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=124))
    assert [s.response_ids for s in a] != [s.response_ids for s in c]
    assert len({tuple(s.response_ids) for s in a}) > 6  # the n samples of a prompt differ


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    for sp in (SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8, seed=5),
               SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=5)):
        assert [s.response_ids for s in engine.generate(PROMPTS, sp)] == [s.response_ids for s in greedy]


def test_stop_token_ids_and_stop_strings(engine):
    greedy = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=12))[0].response_ids
    # stop token: the response ends at (and keeps) its first occurrence
    stop_tok = greedy[4]
    cut = greedy.index(stop_tok) + 1
    s = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop_tok,)))[0]
    assert (s.response_ids, s.finish_reason) == (greedy[:cut], "stop")
    # EOS given to the engine stops too
    eos_engine = LocalEngine(engine.model, engine.tokenizer, eos_token_ids=(stop_tok,))
    assert eos_engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=12))[0].response_ids == \
        greedy[:cut]
    # stop string: the shortest prefix whose decoded text contains it (same per-sample seed -> same prefix)
    tok = engine.tokenizer
    base = SamplingParams(n=6, temperature=1.0, max_new_tokens=12, seed=7)
    free = engine.generate(PROMPTS[:1], base)
    j, full = next((s.sample_index, s.response_ids) for s in free
                   if len(tok.decode(s.response_ids, skip_special_tokens=True)) >= 4)
    stop = tok.decode(full, skip_special_tokens=True)[2:4]
    m = next(m for m in range(1, len(full) + 1) if stop in tok.decode(full[:m], skip_special_tokens=True))
    s = engine.generate(PROMPTS[:1], SamplingParams(n=6, temperature=1.0, max_new_tokens=12, seed=7,
                                                    stop=["@@", stop]))[j]
    assert (s.response_ids, s.finish_reason, s.info["matched_stop"]) == (full[:m], "stop", stop)
    # length wins when both happen on the last allowed token (as in SGLang)
    s = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=cut, stop_token_ids=(stop_tok,)))[0]
    assert (len(s.response_ids), s.finish_reason) == (cut, "length")


def test_update_weights_loads_hf_tensors_strictly():
    src, dst = make_model(seed=1), make_model(seed=2)
    eng = LocalEngine(dst, eos_token_ids=())
    sd = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}  # tied: the HF file omits it
    names = list(sd)
    eng.update_weights(iter([[(n, sd[n]) for n in names[:5]], [(n, sd[n]) for n in names[5:]]]), version=3)
    ids = torch.tensor([PROMPTS[0]])
    dst_sd = dst.state_dict()
    assert all(torch.equal(dst_sd[k], v) for k, v in src.state_dict().items())  # every tensor, tied head included
    with torch.no_grad():  # the engine's linears run on oneDNN on CPU (utils/cpu_gemm.py): equal up to fp32 rounding
        torch.testing.assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    sp = SamplingParams(temperature=0, max_new_tokens=3)
    assert eng.generate(PROMPTS[:1], sp)[0].weight_version == 3
    with pytest.raises(WeightUpdateError, match="unknown tensor name"):
        eng.update_weights([[("model.layers.9.mlp.up_proj.weight", torch.zeros(1))]])
    with pytest.raises(WeightUpdateError, match="shape"):
        eng.update_weights([[("model.norm.weight", torch.zeros(3))]])
    with pytest.raises(WeightUpdateError, match="received nothing"):
        eng.update_weights([[("model.norm.weight", sd["model.norm.weight"])]])


def test_bad_sampling_params_and_prompts(engine):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams())
