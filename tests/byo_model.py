"""A first-day user's model and data, built offline: a tiny Hugging Face Qwen3 (bf16 weights, as real checkpoints
ship) with a real byte-level BPE tokenizer trained here by the `tokenizers` library and a Qwen-style chat
template; a verl Parquet file and a GSM8K-style question / answer JSONL. Used by tests/test_byo.py."""

from __future__ import annotations

import json
from pathlib import Path

#: Qwen's ChatML layout, with Qwen3's enable_thinking switch (chat_template_kwargs) and an optional system turn
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append((f"Tom has {a} apples and buys {b} more. How many apples does he have now?", str(a + b)))
    return out


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [q + " " + a for q, a in problems(200, seed=1)] + [
        "Please reason step by step, and put your final answer within \\boxed{}.", "user assistant system think"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    return hf


def build_model(out: Path) -> Path:
    """The tokenizer and a randomly initialised 2-layer Qwen3 in bf16 (config.json, model.safetensors)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def write_verl_parquet(path: Path, n: int, seed: int, sources: tuple[str, ...] = ("openai/gsm8k",)) -> Path:
    """verl's layout: data_source, prompt (chat messages), ability, reward_model.ground_truth, extra_info."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": sources[i % len(sources)],
             "prompt": [{"role": "user", "content": q + " Let's think step by step and output the final answer "
                                                        "within \\boxed{}."}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": a},
             "extra_info": {"split": "train", "index": i}} for i, (q, a) in enumerate(problems(n, seed))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_qa_jsonl(path: Path, n: int, seed: int) -> Path:
    """GSM8K's layout: question, answer."""
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in problems(n, seed)))
    return path
