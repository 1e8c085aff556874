"""Make a tiny random-weight Llama and a byte-level BPE tokenizer, locally (no download).

Runs with the vLLM venv's Python (it needs torch, transformers and tokenizers)::

    python scripts/real/vllm_make_model.py OUT_DIR

Random weights give gibberish text, but real tokenization, real scheduling and a real
prefix cache. The chat template frames every message with special tokens, so a
conversation's next turn always extends the previous turn's tokens: byte-level BPE never
merges across a special token, and the generation prompt is the bare `<|assistant|>` token,
which the next turn renders again before the answer.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SPECIALS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
VOCAB_SIZE = 2048
STAMP = "kvcache-tiny-llama-v2"  # bump when what this script makes changes


def corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = (
        "the a of to and in is that for it as with was on be by at this are from or an "
        "policy clause section user system assistant model token cache prefix route server "
        "request answer question conversation engine proxy vllm lmcache chunk block hit miss "
        "what does say and about explain more detail please thank you yes no maybe number"
    ).split()
    lines = []
    for _ in range(n_lines):
        n = rng.randint(5, 20)
        parts = [
            rng.choice(words) if rng.random() < 0.8 else f"{rng.choice(words)}{rng.randint(0, 999)}"
            for _ in range(n)
        ]
        lines.append(" ".join(parts) + rng.choice([".", "?", "!", ","]))
    return lines


def make(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
        additional_special_tokens=SPECIALS[2:], model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # what vLLM on a CPU runs anyway
    model.save_pretrained(out)
    (out / "kvcache-stamp.json").write_text(json.dumps({"stamp": STAMP}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: vllm_make_model.py OUT_DIR")
    make(Path(sys.argv[1]))
