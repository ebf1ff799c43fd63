"""A tiny causal LM built locally and deterministically: no download, real loading path.

The weights come from a fixed seed and the tokenizer is a byte-level BPE trained on a fixed text,
so every node that builds it gets the same files. It is saved with `save_pretrained` and loaded
back like any other model directory, so the embedded default exercises the real path.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Distributed inference splits a model across many ranks.",
    "Tensor parallel layers shard their weights; an all-reduce joins the partial sums.",
    "One command starts the job, one shows its health, one takes it down.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } ' \" - _ / @ # %",
]
SEED = 1234
MARKER = "dslaunch-tiny-model"
# bumped whenever the built files change, so a cached copy of an older build is never reused
NAME = "tiny-llama-v3"


def build_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        # printable ASCII only (byte-level: space is 'Ġ', newline 'Ċ'), so whatever the random
        # weights pick decodes to readable text; other characters in a prompt become <unk>
        initial_alphabet=[chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"],
        limit_alphabet=96,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# one line per message, then the assistant's turn: enough for /v1/chat/completions on the demo model
CHAT_TEMPLATE = (
    "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    # the newline as an expression: transformers renders with trim_blocks, which eats one after a tag
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build(path: str | Path, heads: int = 4, layers: int = 2, hidden: int = 64) -> Path:
    """Write the tiny model to `path` (idempotent: an existing complete copy is kept)."""
    out = Path(path)
    if (out / MARKER).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # ranks sharing a node build it once: the others wait on the lock, then find the marker
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MARKER).exists():
            _write(out, heads, layers, hidden)
    return out


def _write(out: Path, heads: int, layers: int, hidden: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(cfg)
        # default init is tiny for a 64-wide model: widen it so greedy output is not one token
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        raise RuntimeError(f"building the tiny model in {out} left no config.json or weights")
    (out / MARKER).write_text("built by dslaunch.tinymodel\n")
