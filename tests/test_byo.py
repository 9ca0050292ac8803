"""The first day of a verl / slime user, as CI: their own Hugging Face model and their own data files.

A tiny Qwen3 in bf16 with a real byte-level BPE tokenizer and a Qwen chat template (tests/byo_model.py) goes
through the micro pipeline on a verl Parquet (chat-message prompts, reward_model.ground_truth, data_source
routed to a custom reward) and on a GSM8K-style question / answer JSONL; the run's final policy is exported,
reloaded with transformers, and evaluated with `erpd eval`. Model dirs that cannot serve the data (no tokenizer,
no chat template) are refused in one line. Nothing here depends on what the random model answers: the rewards
checked are recomputed from the stored responses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byo_model import build_model, write_qa_jsonl, write_verl_parquet  # noqa: E402
from test_pipeline import clean_env  # noqa: E402

REWARD_PY = '''
def parity(data_source, solution_str, ground_truth, extra_info=None):
    """A custom reward that sees every argument: 1 for an odd-length response of an even-index record."""
    assert data_source == "custom/parity" and extra_info["split"] == "train", (data_source, extra_info)
    return {"score": float(len(solution_str) % 2 == 1 and extra_info["index"] % 2 == 0), "length": len(solution_str)}
'''

#: the micro preset, cut to one teacher and one student (what a first run needs to show every stage works)
TRIM = ["teachers={ce: {loss: ce, steps: 2, mini_batch_size: 8, save_every: 2}}",
        "students={s1_ce: {strategies: [1], teacher: ce, steps: 2, mini_batch_size: 8}}", "onpolicy=null",
        "data.prompts_per_batch=8", "rollout.n_samples=2", "rollout.max_new_tokens=16", "eval.k=1", "eval.every=2",
        "data.eval_prompts=4"]


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    build_model(root / "model")
    write_verl_parquet(root / "train.parquet", 16, seed=1, sources=("openai/gsm8k", "custom/parity"))
    write_qa_jsonl(root / "train.jsonl", 16, seed=2)
    write_qa_jsonl(root / "eval.jsonl", 8, seed=3)
    (root / "my_reward.py").write_text(REWARD_PY)
    return root


def erpd(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erpd_megatron.cli", *map(str, args)], capture_output=True, text=True,
                          env=clean_env(), cwd=cwd)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def one_line_exit_2(rc_err: tuple[int, str], needle: str) -> None:
    rc, err = rc_err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err[-3000:]


def eval_in_process(capsys, *args) -> tuple[int, str]:
    from erpd_megatron.rollout.eval import main

    capsys.readouterr()  # what this test printed before (its own transformers loads) is not erpd eval's
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_verl_parquet_run_export_reload_eval(byo, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erpd_megatron.data.prompts import load_prompts
    from erpd_megatron.data.rollout_store import RolloutStore

    run = tmp_path / "run"
    ok(erpd("run", "--config", "micro", f"run_dir={run}", f"model.base={byo / 'model'}",
            f"data.train={byo / 'train.parquet'}", f"data.eval={byo / 'eval.jsonl'}", *TRIM,
            f"reward.custom={byo / 'my_reward.py'}:parity", "reward.custom_sources=[custom/parity]",
            "data.chat_template_kwargs={enable_thinking: false}", "data.system=You are careful."))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["setup"] == {"model": str(byo / "model"), "train": str(byo / "train.parquet"),
                                "eval": str(byo / "eval.jsonl"), "eval_k": 1, "eval_prompts": 4}
    assert summary["final"]["method"] == "s1_ce" and summary["final"]["step"] == 2
    report = (run / "report.md").read_text()
    assert f"Model `{byo / 'model'}`, trained on `{byo / 'train.parquet'}`, evaluated on `{byo / 'eval.jsonl'}`" in report

    # what the engine saw and how it was scored: the record's messages under data.system, the template's kwargs,
    # no instruction appended to chat messages; custom/parity rows scored by my_reward.py, the others by math-verify
    tok = AutoTokenizer.from_pretrained(byo / "model")
    prompts = {p.id: p for p in load_prompts(byo / "train.parquet")}
    table = RolloutStore(run / "rollouts").read_table(0).to_pylist()
    assert len(table) == 16
    for row in table:
        p = prompts[row["prompt_id"]]
        text = tok.decode(row["prompt_ids"])
        assert text.startswith("<|im_start|>system\nYou are careful.<|im_end|>\n<|im_start|>user\n" + p.problem)
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and "Please reason" not in text
        response = tok.decode(row["response_ids"], skip_special_tokens=True)
        if p.data_source == "custom/parity":
            assert row["reward"] == float(len(response) % 2 == 1 and p.meta["extra_info"]["index"] % 2 == 0)
        else:
            assert row["reward"] in (0.0, 1.0)

    # the final policy as a self-contained HF directory, in the source's dtype
    exported = ok(erpd("export", run))
    assert "Apex" not in exported.stderr and "Warning" not in exported.stderr  # the known notes are filtered
    final = run / "final"
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "generation_config.json", "model.safetensors.index.json"):
        assert (final / f).is_file(), f
    from safetensors import safe_open

    shard = next(final.glob("model-*.safetensors"))
    with safe_open(shard, "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}  # noqa: SIM118
    tok2 = AutoTokenizer.from_pretrained(final)
    assert len(tok2) == len(tok) and tok2.chat_template == tok.chat_template and tok2.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(final)
    import torch

    assert model.dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok2.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()

    # erpd eval on the export, on the training Parquet's format and on the JSONL
    out = tmp_path / "eval.json"
    rc, err = eval_in_process(capsys, "--benchmark", byo / "train.parquet", "--model", final, "--k", "1", "--limit",
                              "4", "--max-new-tokens", "8", "--custom-reward", f"{byo / 'my_reward.py'}:parity",
                              "--custom-sources", "custom/parity", "--out", out)
    assert rc == 0, err
    total = json.loads(out.read_text())["total"]
    assert total["problems"] == 4 and total["model"] == str(final) and total["benchmark"].endswith("train.parquet")
    assert "Loading weights" not in err  # no progress bar in a log that is not a terminal

    # model dirs that cannot serve the data: one line, exit 2, before any model is loaded
    bare = tmp_path / "bare"
    shutil.copytree(final, bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / f).unlink()
    one_line_exit_2(eval_in_process(capsys, "--benchmark", byo / "eval.jsonl", "--model", bare), "tokenizer")
    no_template = tmp_path / "no_template"
    shutil.copytree(final, no_template)
    (no_template / "chat_template.jinja").unlink()
    one_line_exit_2(eval_in_process(capsys, "--benchmark", byo / "train.parquet", "--model", no_template),
                    "has no chat template, but prompt")
    r = erpd("run", "--config", "micro", f"run_dir={tmp_path / 'r2'}", f"model.base={bare}",
             f"data.train={byo / 'train.jsonl'}", f"data.eval={byo / 'eval.jsonl'}", *TRIM)
    one_line_exit_2((r.returncode, r.stderr), "tokenizer")
    assert not (tmp_path / "r2" / "base").exists()


def test_question_answer_jsonl_run(byo, tmp_path):
    """GSM8K's field names, found without any key given; text prompts get the boxed instruction (the "auto" rule),
    eval set refused until it is named."""
    run = tmp_path / "run"
    base = ["run", "--config", "micro", f"run_dir={run}", f"model.base={byo / 'model'}",
            f"data.train={byo / 'train.jsonl'}", *TRIM]
    r = erpd(*base)
    one_line_exit_2((r.returncode, r.stderr), "data.eval is not set")
    ok(erpd(*base, f"data.eval={byo / 'eval.jsonl'}"))
    from transformers import AutoTokenizer

    from erpd_megatron.data.rollout_store import RolloutStore

    tok = AutoTokenizer.from_pretrained(byo / "model")
    row = RolloutStore(run / "rollouts").read_table(0).to_pylist()[0]
    assert "How many apples does he have now?\nPlease reason step by step" in tok.decode(row["prompt_ids"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["setup"]["train"] == str(byo / "train.jsonl") and set(summary["methods"]) == {"ce", "s1_ce"}


def test_export_template_lookup(tmp_path):
    """A trainer checkpoint has no hf/ of its own: the export takes the run's imported base (tokenizer, template,
    dtypes, pass-through tensors); an imported checkpoint its own hf/; one outside any run dir none."""
    from checkpoints_conv.convert import find_hf_template, generation_config

    base_hf = tmp_path / "run" / "base" / "iter_0000000" / "hf"
    base_hf.mkdir(parents=True)
    (base_hf / "config.json").write_text("{}")
    ckpt = tmp_path / "run" / "ckpt" / "s1_ce" / "iter_0000004"
    ckpt.mkdir(parents=True)
    assert find_hf_template(ckpt) == base_hf.resolve()
    assert find_hf_template(base_hf.parent) == base_hf
    alone = tmp_path / "elsewhere" / "iter_0000004"
    alone.mkdir(parents=True)
    assert find_hf_template(alone) is None
    assert generation_config({"text_config": {"eos_token_id": 7, "pad_token_id": 0}}) == {"eos_token_id": 7,
                                                                                          "pad_token_id": 0}
