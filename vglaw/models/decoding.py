"""Decoding a describing head's expressions: beam search and seeded sampling.

Both take `step(memory, ids) -> logits` (B, T, vocab) (an `ExpressionDecoder`) and give, per
query, K candidates as token ids without the begin and end tokens, with their summed log
probability, best first. Each query's candidates depend on that query alone (its memory, and
for sampling its own generator seeded with `seed`), not on the others decoded beside it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Step = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Candidate:
    """One generated expression: its token ids (no `[CLS]` / `[SEP]`) and log probability."""

    ids: tuple[int, ...]
    log_prob: float


def _next_log_probs(step: Step, memory: Tensor, seqs: Tensor, eos: int, first: bool) -> Tensor:
    """(N, V) log probabilities of the next token; no end before the first word."""
    logits = step(memory, seqs)[:, -1]
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # (N, V), fp32 at least
    if first:
        logp[:, eos] = float("-inf")
    return logp


@torch.no_grad()
def beam_search(step: Step, memory: Tensor, bos: int, eos: int, beams: int = 4, max_len: int = 24,
                length_penalty: float = 0.0) -> list[list[Candidate]]:
    """The `beams` best expressions of each query by beam search.

    Args:
        step: the decoder.
        memory: (B, M, D) what it reads, one row per query.
        bos, eos: begin and end token ids.
        beams: K, beams kept and candidates returned per query.
        max_len: longest sequence, the begin token included.
        length_penalty: rank finished candidates by log p / len^α (0: by log p).
    """
    B, K = memory.shape[0], beams
    mem = memory.repeat_interleave(K, dim=0)  # (B*K, M, D)
    seqs = torch.full((B * K, 1), bos, dtype=torch.long, device=memory.device)  # (B*K, 1)
    dtype = torch.promote_types(memory.dtype, torch.float32)
    scores = torch.full((B, K), float("-inf"), device=memory.device, dtype=dtype)
    scores[:, 0] = 0.0  # one live beam at the start: the others would repeat it
    done = torch.zeros(B * K, dtype=torch.bool, device=memory.device)
    for t in range(max_len - 1):
        logp = _next_log_probs(step, mem, seqs, eos, first=t == 0)  # (B*K, V)
        V = logp.shape[1]
        # a finished beam continues only with `eos` at no cost, so it keeps its score and place
        logp[done] = float("-inf")
        logp[done, eos] = 0.0
        total = (scores.view(-1, 1) + logp).view(B, K * V)  # (B, K*V)
        scores, flat = total.topk(K, dim=1)  # (B, K)
        parent = (flat // V + torch.arange(B, device=flat.device)[:, None] * K).view(-1)  # (B*K,)
        token = (flat % V).view(-1, 1)  # (B*K, 1)
        seqs = torch.cat([seqs[parent], token], dim=1)
        done = done[parent] | (token.view(-1) == eos)
        if bool(done.all()):
            break
    out = []
    for b in range(B):
        cands = []
        for k in range(K):
            if not torch.isfinite(scores[b, k]):
                continue
            ids = [int(i) for i in seqs[b * K + k, 1:].tolist()]
            ids = tuple(ids[: ids.index(eos)] if eos in ids else ids)
            cands.append(Candidate(ids, float(scores[b, k])))
        key = (lambda c: c.log_prob / max(1, len(c.ids) + 1) ** length_penalty) if length_penalty else \
            (lambda c: c.log_prob)
        out.append(sorted(cands, key=key, reverse=True))
    return out


@torch.no_grad()
def sample(step: Step, memory: Tensor, bos: int, eos: int, samples: int = 4, max_len: int = 24,
           temperature: float = 1.0, seed: int = 0) -> list[list[Candidate]]:
    """`samples` expressions per query drawn from the decoder (at `temperature`); each query
    draws from its own generator seeded with `seed`, so its candidates do not depend on the
    batch. Duplicates are merged; best (most likely) first."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = []
    for b in range(memory.shape[0]):
        gen = torch.Generator(device=memory.device).manual_seed(seed)
        mem = memory[b : b + 1].expand(samples, -1, -1)  # (S, M, D)
        seqs = torch.full((samples, 1), bos, dtype=torch.long, device=memory.device)
        logp_sum = torch.zeros(samples, device=memory.device, dtype=torch.promote_types(memory.dtype, torch.float32))
        done = torch.zeros(samples, dtype=torch.bool, device=memory.device)
        for t in range(max_len - 1):
            logp = _next_log_probs(step, mem, seqs, eos, first=t == 0)  # (S, V)
            token = torch.multinomial((logp / temperature).softmax(-1), 1, generator=gen)  # (S, 1)
            token[done] = eos
            logp_sum += torch.where(done, torch.zeros_like(logp_sum), logp.gather(1, token).squeeze(1))
            seqs = torch.cat([seqs, token], dim=1)
            done |= token.squeeze(1) == eos
            if bool(done.all()):
                break
        found: dict[tuple[int, ...], float] = {}
        for row, lp in zip(seqs[:, 1:].tolist(), logp_sum.tolist()):
            ids = tuple(row[: row.index(eos)] if eos in row else row)
            found.setdefault(ids, lp)
        out.append(sorted((Candidate(k, v) for k, v in found.items()), key=lambda c: c.log_prob, reverse=True))
    return out
