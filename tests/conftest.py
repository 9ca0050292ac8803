"""Shared fixtures."""

import os

import pytest

# Tests never read or fill the user's shared base cache (~/.cache/erpd): a stale base there would make a test
# depend on what an earlier checkout left behind. The test of the cache itself points ERPD_CACHE elsewhere.
os.environ["ERPD_CACHE"] = "off"


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    """A short warm-up of the toy base (the demo's is longer), shared by every test that runs the pipeline.

    Its accuracy is whatever the warm-up reaches on this machine (0 % on some CPUs of the same kind): no test
    may rely on it. A test that needs correct samples writes them itself (`mixed_batch`)."""
    from erpd_megatron.toy.warmup import WarmupConfig, ensure_base_model

    out = tmp_path_factory.mktemp("toy_base") / "hf"
    return ensure_base_model(out, WarmupConfig(steps=120, eval_prompts=32, eval_samples=2), log=lambda *a: None)


def write_mixed_batch(run_dir, base_hf, prompts_per_batch: int, n_samples: int, seed: int = 0) -> list[float]:
    """Pre-write rollout batch 0 of `run_dir` with half correct, half wrong toy responses per prompt.

    `collect` reuses a batch already in the store (the resume rule), so the pipeline trains on this batch:
    every group holds both rewards whatever the base's accuracy, hence the reward-driven losses (MSE, PPO,
    GRPO) have a gradient by construction. Correct = the task's worked target; wrong = the same with the
    boxed answer off by one. Behaviour log-probs are the base's own (diagnostic only: the trainer recomputes
    `old_logprobs` in Megatron). Returns the rewards in row order.
    """
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erpd_megatron.data.prompts import encode_prompts
    from erpd_megatron.data.rollout_store import RolloutRecord, RolloutStore
    from erpd_megatron.toy import task

    tok = AutoTokenizer.from_pretrained(str(base_hf))
    model = AutoModelForCausalLM.from_pretrained(str(base_hf)).eval()
    problems = task.train_problems(prompts_per_batch, seed=seed)
    prompt_ids = encode_prompts(tok, [p.problem for p in problems], instruction=None)
    records = []
    for g, (p, pids) in enumerate(zip(problems, prompt_ids)):
        wrong = p.target.replace(f"{{{p.answer}}}", f"{{{int(p.answer) + 1}}}")
        for j in range(n_samples):
            correct = j % 2 == 0
            resp = tok((p.target if correct else wrong), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([pids + resp])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            lp = logp[torch.arange(len(pids) - 1, ids.shape[1] - 1), ids[0, len(pids):]].tolist()
            records.append(RolloutRecord(prompt_ids=pids, response_ids=resp, behaviour_logprobs=lp,
                                         reward=1.0 if correct else 0.0, group_id=g, prompt_id=p.id,
                                         finish_reason="stop", sampling_params={"injected": "mixed_batch"}))
    RolloutStore(Path(run_dir) / "rollouts").write_batch(0, records)
    return [r.reward for r in records]
