"""Log probabilities of the chosen tokens and their best alternatives (rank 0 only).

Computed from the very logits the sampler chose from (after penalties, logit bias and a
structured output's grammar mask), divided by the row's temperature as OpenAI and vLLM document
it (a greedy row: by 1), in one pass over the rows that asked, with one transfer to the host.

A prompt's own tokens are scored from the raw logits (no temperature, no penalty): the model's
log-likelihood of each token given the ones before it, what evaluation harnesses sum.
"""

from __future__ import annotations

from typing import Any

FLOOR = -9999.0  # the least logprob reported


def token_logprobs(logits: Any, at: list[int], tokens: list[int], temps: list[float], ks: list[int]) -> list[Any]:
    """Per row `at[j]`: (the chosen token's logprob, [(id, logprob) of the best ks[j]])."""
    import torch

    dev = logits.device
    sel = torch.tensor(at, dtype=torch.long, device=dev)
    t = torch.tensor([x if x > 0 else 1.0 for x in temps], dtype=torch.float32, device=dev).unsqueeze(1)
    # a token the grammar forbids is -inf: clamped as vLLM does, since JSON has no -Infinity
    lp = torch.log_softmax(logits.index_select(0, sel).float() / t, dim=-1).clamp(min=FLOOR)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in at], device=dev).unsqueeze(1)).squeeze(1)
    k = max(ks)
    if k:
        vals, ids = torch.topk(lp, k, dim=-1)
        top_v, top_i = vals.tolist(), ids.tolist()
    else:
        top_v = top_i = [[] for _ in at]
    return [(c, list(zip(top_i[j][: ks[j]], top_v[j][: ks[j]], strict=True))) for j, c in enumerate(chosen.tolist())]


def prompt_logprobs(logits: Any, targets: list[int], k: int) -> list[Any]:
    """Per logits row i (the position before `targets[i]`): (the target's logprob, [(id, logprob)
    of the best k])."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(targets, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    if not k:
        return [(c, []) for c in chosen]
    vals, ids = torch.topk(lp, k, dim=-1)
    return [(c, list(zip(i, v, strict=True))) for c, i, v in zip(chosen, ids.tolist(), vals.tolist(), strict=True)]


DOC_KEYS = ("tokens", "token_ids", "token_logprobs", "top_logprobs")


def joined_docs(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pieces of a row's logprobs (as its chunks carried them) as one answer, in order."""
    return {key: [v for doc in docs for v in doc[key]] for key in DOC_KEYS}


def doc_tail(doc: dict[str, Any], skip: int) -> dict[str, Any]:
    """A logprobs piece without its first `skip` tokens."""
    return {key: doc[key][skip:] for key in DOC_KEYS}
