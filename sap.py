"""SAP, Semantic Adaptive Pruning: drop low-importance input tokens inside the forward pass.

At one layer l (`prune_layer`), every input token gets an importance score and only the top
fraction rho (`keep`) goes on to the later layers (METHOD.md, "SAP"):

    attention centrality  S_attn(i) = sum_h sum_j A[h, j, i]   (column sums of layer l's attention,
                                                                 over real queries j)
    semantic saliency     S_sem(i)  = || h_i ||_1               (layer l's output, as in RASTP's code)
    importance            I_i       = S_sem(i) * S_attn(i)

The kept indices are sorted ascending, so order is kept, and hidden states, masks and positions
are gathered together. Which tokens may go is a per-token prior: 0 for candidates (ranked by
importance), +inf for tokens that always stay (Qwen's separator and target), -inf for padding
(never kept while a real token of the row is dropped). `k` comes from shapes and the config only,
so a compiled step or a CUDA graph sees the same shapes at every step.
"""
import math

import torch

SCORES = ("attn_l1", "attn", "l1", "l2", "random", "stride")


def n_kept(cfg, T, fixed):
    """Tokens left after pruning a padded length T of which `fixed` always stay: the fixed ones and a
    fraction `keep` of the longest history's candidates (cfg.sap_len; else of this batch's), at least
    one, at most all. RASTP takes a third of the batch's padded length, but GRID pads every batch to
    the longest history, so k is a third of the longest history's tokens and a shorter history than
    that loses nothing. Our batches are cut to length buckets; a fraction of the bucket would prune
    short histories harder than RASTP ever does."""
    return min(T, fixed + max(1, math.ceil(cfg.keep * (cfg.sap_len or T - fixed))))


def prunes(cfg, T, fixed):
    """Whether SAP drops anything from a padded length T: short buckets skip the column sums too."""
    return n_kept(cfg, T, fixed) < T


def prior_from_mask(mask):
    """Every real token a candidate, padding never: (B, T) bool -> (B, T) float prior."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)


@torch.no_grad()
def column_sums(q, k, scale, mask, causal, query_valid):
    """S_attn: column sums of the softmax attention A (B, H, T, S), over heads and real queries.
    Recomputed from q and k beside the fused kernel, which never materialises A. -> (B, S)"""
    if k.size(1) != q.size(1):  # grouped-query attention: each kv head serves a group of query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    s = (q @ k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
    elif causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(S - T + 1), -math.inf)
    a = s.softmax(-1).sum(1)  # (B, T, S): summed over heads
    return (a * query_valid[..., None].float()).sum(1)


def importance(kind, x, colsum, valid, keep, causal_norm=False):
    """Score (B, T) of each token under `kind` (SCORES); higher stays. x: layer l's output (B, T, D)."""
    if causal_norm:
        # In a causal stack token i is seen by the real queries at or after it: early tokens collect
        # more column mass just by position. Divide by that count (a reverse cumulative sum).
        colsum = colsum / valid.flip(1).cumsum(1).flip(1).clamp(min=1)
    if kind == "attn_l1":
        return x.detach().abs().sum(-1).float() * colsum
    if kind == "attn":
        return colsum
    if kind == "l1":
        return x.detach().abs().sum(-1).float()
    if kind == "l2":
        return x.detach().float().norm(dim=-1)
    if kind == "random":
        return torch.rand(x.shape[:2], device=x.device)
    if kind == "stride":  # evenly spaced: positions where i * keep crosses an integer rank first
        i = torch.arange(x.size(1), device=x.device, dtype=torch.float)
        return -torch.remainder(i * keep, 1.0).expand(x.shape[:2])
    raise ValueError(f"unknown --sap-score '{kind}': use one of {', '.join(SCORES)}")


def ascending(top, T):
    """The same (B, k) indices into T tokens, in ascending order, without a sort: mark the kept
    tokens, number them by a running count and scatter each index to its slot. (A sort compiles to
    Triton's bitonic sort, which ptxas took more than 4 minutes to build at some k on the H100.)"""
    B, k = top.shape
    kept = torch.zeros(B, T, dtype=torch.bool, device=top.device).scatter(1, top, True)
    slot = (kept.cumsum(1) - 1).masked_fill(~kept, k)  # dropped tokens all go to a spare slot k
    every = torch.arange(T, device=top.device).expand(B, T)
    slots = torch.zeros(B, k + 1, dtype=torch.long, device=top.device).scatter(1, slot, every)
    return slots[:, :k].contiguous()  # one block, as searchsorted (Qwen's `at`) wants it


def prune(cfg, x, colsum, prior, fixed, pos, *others):
    """Keep the n_kept(cfg, T, fixed) best tokens of x (B, T, D), in order.

    Returns the kept original indices (B, k), x (B, k, D), their positions (B, k) (original, or
    re-indexed 0..k-1 when cfg.sap_positions == "compact", as RASTP does) and `others` gathered
    along dimension 1 (masks)."""
    B, T, D = x.shape
    k = n_kept(cfg, T, fixed)
    score = importance(cfg.sap_score, x, colsum, prior > -math.inf, cfg.keep, cfg.sap_causal_norm)
    idx = ascending((score + prior).topk(k, dim=1).indices, T)  # + inf stays, - inf goes last
    x = x.gather(1, idx[..., None].expand(-1, -1, D))
    if cfg.sap_positions == "compact":
        pos = torch.arange(k, device=x.device).expand(B, k)
    else:
        pos = pos.expand(B, T).gather(1, idx)
    return (idx, x, pos, *(t.gather(1, idx) for t in others))
