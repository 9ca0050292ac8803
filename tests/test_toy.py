"""Toy task, local tokenizer and the deterministic warm-up of the tiny base model (erpd_megatron/toy)."""

import json
import re

import pytest
import torch

from erpd_megatron.toy import task as toy
from erpd_megatron.toy.sampling import generate, score
from erpd_megatron.toy.tokenizer import BOXED, VOCAB, build_tokenizer
from erpd_megatron.toy.warmup import WarmupConfig, toy_model_config, warmup

TARGET_RE = re.compile(r"^(\d+)\*(\d+)=(\d+);(\d+)\+(\d+)=(\d+);\\boxed\{(\d+)\}$")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_answers_and_scratchpads_are_correct():
    probs = toy.train_problems(500, seed=1) + toy.eval_problems(500, seed=1)
    for p in probs:
        a, b, c = map(int, re.fullmatch(r"(\d+)\*(\d+)\+(\d+)=", p.problem).groups())
        assert int(p.answer) == a * b + c
        m = TARGET_RE.fullmatch(p.target)
        assert m, p.target
        a2, b2, prod, prod2, c2, total, boxed = map(int, m.groups())
        assert (a2, b2, c2) == (a, b, c)
        assert prod == prod2 == a * b
        assert total == boxed == a * b + c


def test_train_and_heldout_are_a_disjoint_partition():
    train, held = toy.train_pool(), toy.heldout_pool()
    assert set(train).isdisjoint(held)
    assert len(train) + len(held) == toy.ToyTask().size == 90 * 8 * 90
    assert 0.10 < len(held) / toy.ToyTask().size < 0.15  # one in eight, by hash
    ev = toy.eval_problems(512, seed=0)
    assert len(set(ev)) == 512 and set(ev) <= set(held)
    for seed in range(3):
        assert set(toy.train_problems(1000, seed=seed)).isdisjoint(ev)
    assert toy.eval_problems(64, seed=0) == toy.eval_problems(64, seed=0)
    assert toy.eval_problems(64, seed=0) != toy.eval_problems(64, seed=1)
    with pytest.raises(ValueError, match="only"):
        toy.eval_problems(len(held) + 1)


def test_write_jsonl_rows(tmp_path):
    probs = toy.eval_problems(5, seed=3)
    path = toy.write_jsonl(probs, tmp_path / "sub" / "eval.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [p.id for p in probs]
    for r in rows:
        assert set(r) == {"problem", "answer", "id"}
        assert all(isinstance(v, str) for v in r.values())
        a, b, c = map(int, re.findall(r"\d+", r["problem"]))
        assert int(r["answer"]) == a * b + c
    assert toy.sft_pairs(probs)[0] == (probs[0].problem, probs[0].target)


def test_tokenizer_round_trips_task_strings(tok):
    # every held-out problem and every 32nd training problem (~20k strings; all 130k take ~10 s on a busy CPU)
    texts = [s for p in toy.train_pool()[::32] + toy.heldout_pool() for s in (p.problem, p.target)]
    enc = [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, ids in zip(texts, enc):
        # one token per character, \boxed{ one token, no <unk> (joining the vocabulary entries gives the text back)
        assert "".join(VOCAB[i] for i in ids) == text
        assert len(ids) == len(text) - text.count(BOXED) * (len(BOXED) - 1)
    assert tok.batch_decode(enc[::7]) == texts[::7]  # the decoder too (a fixed subsample: batch_decode is slow)
    assert len(tok) == len(VOCAB) == 24
    assert tok.convert_ids_to_tokens(tok.encode(BOXED, add_special_tokens=False)) == [BOXED]
    assert tok.decode(tok.encode("12 ab", add_special_tokens=False)) == "12 <unk><unk>"


def test_chat_template(tok, tmp_path):
    p = toy.eval_problems(1)[0]
    ids = tok.apply_chat_template([{"role": "user", "content": p.problem}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    body = tok.encode(p.problem, add_special_tokens=False)
    assert ids == [tok.bos_token_id, VOCAB.index("<|user|>"), *body, VOCAB.index("<|assistant|>")]
    full = tok.apply_chat_template([{"role": "system", "content": "ignored"}, {"role": "user", "content": p.problem},
                                    {"role": "assistant", "content": p.target}], tokenize=False)
    assert full == f"<|bos|><|user|>{p.problem}<|assistant|>{p.target}<|im_end|>"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok2.apply_chat_template([{"role": "user", "content": p.problem}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] == ids
    assert tok2.encode(p.target, add_special_tokens=False) == tok.encode(p.target, add_special_tokens=False)
    assert (tok2.eos_token_id, tok2.pad_token_id, tok2.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)


def test_score_uses_the_boxed_answer():
    assert score("37*4=148;148+15=163;\\boxed{163}", "163") == 1.0
    assert score("37*4=148;148+15=163;\\boxed{164}", "163") == 0.0
    assert score("37*4=148;148+15=163;", "163") == 0.0
    assert score("", "163") == 0.0


def test_toy_model_config_is_tp2_valid():
    cfg = toy_model_config()
    assert cfg["num_attention_heads"] % 2 == 0 and cfg["num_key_value_heads"] % 2 == 0
    assert cfg["vocab_size"] % 8 == 0 and cfg["vocab_size"] >= len(VOCAB)
    assert cfg["eos_token_id"] == VOCAB.index("<|im_end|>")
    with pytest.raises(ValueError):
        toy_model_config(vocab_size=8)


SHORT = WarmupConfig(steps=20, batch_size=32, eval_prompts=8, eval_samples=2)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    d1, d2 = tmp_path_factory.mktemp("w1"), tmp_path_factory.mktemp("w2")
    r1 = warmup(d1, SHORT, log=lambda *_: None)
    r2 = warmup(d2, SHORT, log=lambda *_: None)
    return d1, d2, r1, r2


def test_short_warmup_is_bitwise_deterministic(two_runs):
    from safetensors.torch import load_file

    d1, d2, r1, r2 = two_runs
    assert (d1 / "model.safetensors").read_bytes() == (d2 / "model.safetensors").read_bytes()
    w0 = load_file(str(d1 / "model.safetensors"))
    assert r1["final_loss"] == r2["final_loss"] and r1["final"]["acc_t1"] == r2["final"]["acc_t1"]
    # training did something: every weight matrix left its seeded init (how far the loss fell is a trajectory)
    from erpd_megatron.toy.warmup import build_model

    init = build_model(toy_model_config(**SHORT.model), seed=SHORT.seed).state_dict()
    assert len(w0) > 0
    for name, w in w0.items():
        if w.ndim >= 2:
            assert not torch.equal(w, init[name]), name


def test_warmup_writes_a_loadable_checkpoint_and_caches(two_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d1, _, r1, _ = two_runs
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "warmup.json"):
        assert (d1 / name).is_file(), name
    meta = json.loads((d1 / "warmup.json").read_text())
    assert meta["config"]["steps"] == 20 and 0.0 <= meta["final"]["acc_t1"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(str(d1)).eval()
    tok = AutoTokenizer.from_pretrained(str(d1))
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    # our KV-cached greedy loop equals transformers' own greedy generate
    prompts = [tok.apply_chat_template([{"role": "user", "content": p.problem}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for p in toy.eval_problems(4)]
    ours = generate(model, prompts, eos_id=tok.eos_token_id, temperature=0.0, max_new_tokens=12)
    ref = model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=12,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)[:, len(prompts[0]):].tolist()
    for o, r in zip(ours, ref):
        assert o == r[: len(o)]
    # a second call with the same arguments is a cache hit (no retraining: the file is untouched)
    mtime = (d1 / "model.safetensors").stat().st_mtime_ns
    msgs = []
    assert warmup(d1, SHORT, log=msgs.append) == r1
    assert (d1 / "model.safetensors").stat().st_mtime_ns == mtime and "cached" in msgs[0]


def test_validation_split_is_disjoint_from_eval_and_train():
    held = set(toy.heldout_pool())
    val = toy.validation_problems(512, seed=0)
    assert len(set(val)) == 512 and set(val) <= held and all(toy.is_validation(p) for p in val)
    for seed in range(3):  # whatever the seeds, tuning never sees a reported (test) problem
        assert set(toy.eval_problems(512, seed=seed)).isdisjoint(toy.validation_problems(512, seed=seed + 1))
    assert not any(toy.is_validation(p) for p in toy.train_problems(1000, seed=0))
    n_val = sum(toy.is_validation(p) for p in held)
    assert 0.4 < n_val / len(held) < 0.6  # about half of the held-out partition


def test_constant_schedule_keeps_the_peak_lr_after_warmup():
    from erpd_megatron.toy.warmup import _lr_at

    cfg = WarmupConfig(steps=100, lr=2e-3, lr_warmup_steps=10, schedule="constant")
    assert _lr_at(0, cfg) == pytest.approx(2e-4) and _lr_at(10, cfg) == _lr_at(99, cfg) == 2e-3
    cos = WarmupConfig(steps=100, lr=2e-3, lr_warmup_steps=10)
    assert _lr_at(99, cos) < 0.1 * 2e-3
    with pytest.raises(ValueError, match="schedule"):
        warmup("/nonexistent", WarmupConfig(schedule="linear"))


def test_second_run_dir_reuses_the_shared_base_cache(tmp_path, monkeypatch):
    from erpd_megatron.toy.warmup import ensure_base_model

    monkeypatch.setenv("ERPD_CACHE", str(tmp_path / "cache"))
    cfg = WarmupConfig(steps=2, batch_size=8, eval_prompts=4, eval_samples=1)
    ensure_base_model(tmp_path / "a", cfg, log=lambda *_: None)
    msgs = []
    ensure_base_model(tmp_path / "b", cfg, log=msgs.append)
    assert any("copied cached base" in m for m in msgs) and not any("saved" in m for m in msgs)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    other = WarmupConfig(steps=3, batch_size=8, eval_prompts=4, eval_samples=1)  # another config: no reuse
    msgs.clear()
    ensure_base_model(tmp_path / "c", other, log=msgs.append)
    assert any("saved" in m for m in msgs)
