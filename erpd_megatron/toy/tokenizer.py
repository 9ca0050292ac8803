"""A character-level tokenizer for the toy task, built locally with the `tokenizers` library.

Every character is one token, except ``\\boxed{`` (one token, so the answer marker costs one step) and
the special tokens. Anything outside the alphabet maps to ``<unk>`` rather than failing, so a prompt
template with words in it still tokenizes (the tiny model just cannot read it).

Chat format (a stripped-down Qwen layout; the role names are single tokens)::

    <|bos|><|user|>37*4+15=<|assistant|>37*4=148;148+15=163;\\boxed{163}<|im_end|>

System messages are dropped by the template: the tiny model has never seen one.
``apply_chat_template(messages, add_generation_prompt=True)`` ends with ``<|assistant|>``;
``<|im_end|>`` is the end-of-sequence token. No special token is added by ``encode`` itself
(``add_special_tokens`` is a no-op), so the chat template is the only place a ``<|bos|>`` comes from.
"""

from __future__ import annotations

from pathlib import Path

# Order fixes the ids: specials first (pad = 0), then the alphabet. 24 entries in all.
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_end|>", "<unk>", "<|user|>", "<|assistant|>"]
BOXED = "\\boxed{"
ALPHABET = list("0123456789") + list("+-*=;}") + [BOXED, " "]
VOCAB = SPECIAL_TOKENS + ALPHABET

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|im_end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """Return a ``transformers.PreTrainedTokenizerFast`` for the toy task (no files read or fetched)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split into single characters; `\boxed{` is matched first so it stays whole.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate tokens without spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=256,  # the long task (toy/chain.py) needs ~170; the toy ~35
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tokenizer(model_dir: str | Path):
    """Build the tokenizer and ``save_pretrained`` it into ``model_dir``; returns the tokenizer."""
    tok = build_tokenizer()
    tok.save_pretrained(str(model_dir))
    return tok
