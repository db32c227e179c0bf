"""MAP, Multi-step Auxiliary Prediction: besides the next item, predict the items after it.

The paper adds `lambda * L_MAP` to the next-SID loss (METHOD.md, "MAP"), after multi-token
prediction (Gloeckle et al., 2024): future items give denser supervision than the single target.

    loss = NLL(target SID) + lambda * mean_d NLL(SID of the item d positions after the target)

Depth d reads a state of the main model at the target's code positions (B, L, D), combines it
with the embedding of the future item's previous code (teacher forcing, as for the main target:
BOS, then its first L-1 codes), and predicts that item's codes through the model's own output
projection; embeddings and projection are shared, so a head adds one (2D -> D) matrix, or that and
one block. `parallel` heads all read the main state; `sequential` ones (DeepSeek-V3's MTP) read
depth d-1's state. Heads run only in the loss: generation never calls them.

Future items come only from the training part of each user's sequence (never the validation or
test item); where none exists the labels are -100 and the position is ignored.

`objective` is the whole training loss of both models, MAP or not; `code_logits` normalises each
code over the whole vocabulary or, with --level-softmax, over its own level's codes.
"""
import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import BOS

IGNORE = -100


def future_items(split, steps):
    """(N, steps) item of each training sample's target + d, d = 1..steps, -1 past the training part."""
    lengths = np.array([len(s) for s in split.train_seqs])
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.concatenate(split.train_seqs)
    user = np.searchsorted(split.valid_user, split.train_user)  # row of train_seqs: one per kept user, in order
    pos = split.train_pos[:, None] + np.arange(1, steps + 1)[None]  # (N, steps) positions in the user's sequence
    inside = pos < lengths[user][:, None]
    return np.where(inside, flat[np.minimum(start[user][:, None] + pos, len(flat) - 1)], -1).astype(np.int64)


def targets(tokens, future):
    """Teacher-forced inputs and labels of every depth: future (B, steps) items -> map_dec and
    map_labels, (B, steps, L) each; -100 labels where there is no future item."""
    tok = tokens.item_tokens[future]  # (B, steps, L); item -1 gathers the padding row
    dec = torch.cat([torch.full_like(tok[..., :1], BOS), tok[..., :-1]], -1)
    return {"map_dec": dec, "map_labels": tok.masked_fill((future < 0)[..., None], IGNORE)}


class Heads(nn.Module):
    def __init__(self, cfg, make_block, make_norm):
        super().__init__()
        self.cfg = cfg
        self.norm_h = nn.ModuleList(make_norm() for _ in range(cfg.map_steps))
        self.norm_e = nn.ModuleList(make_norm() for _ in range(cfg.map_steps))
        self.proj = nn.ModuleList(nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False) for _ in range(cfg.map_steps))
        self.blocks = nn.ModuleList(make_block() for _ in range(cfg.map_steps)) if cfg.map_head == "block" else None
        for p in self.proj:  # start near "the state itself": identity on the state half, zero on the embedding
            nn.init.zeros_(p.weight)
            p.weight.data[:, :cfg.d_model] = torch.eye(cfg.d_model)

    def forward(self, h, embed, dec):
        """h (B, L, D) main states, dec (B, steps, L) teacher-forced tokens -> [(B, L, D)] per depth."""
        out, state = [], h
        for d in range(self.cfg.map_steps):
            base = state if self.cfg.map_kind == "sequential" else h
            x = self.proj[d](torch.cat([self.norm_h[d](base), self.norm_e[d](embed(dec[:, d]))], -1))
            if self.blocks is not None:
                x = self.blocks[d](x, causal=True)  # attends over the item's L code positions, causally
            out.append(x)
            state = x
        return out


def losses(model, h, batch):
    """Each depth's mean NLL and token accuracy over the positions that have a future item."""
    stats = {}
    total = 0.0
    for d, x in enumerate(model.map(h, model.embed, batch["map_dec"]), start=1):
        logits = code_logits(model, x).flatten(0, 1)
        labels = batch["map_labels"][:, d - 1].flatten()
        n = (labels != IGNORE).sum().clamp(min=1)  # a batch may have no future at this depth
        nll = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / n
        stats[f"loss_map{d}"] = nll.detach()
        stats[f"acc_map{d}"] = ((logits.argmax(-1) == labels).sum() / n).detach()
        total = total + nll
    return total / model.cfg.map_steps, stats


def code_logits(model, h):
    """Float32 logits of the states h (..., L, D) that predict an item's L codes: over the whole
    vocabulary, or with --level-softmax over column l's own codes at position l (GRID's per-level heads)."""
    logits, sizes = model.head(h).float(), model.cfg.code_sizes
    if model.cfg.level_softmax:  # column l owns tokens [edges[l], edges[l + 1]); the special tokens come first
        if not sizes:
            raise ValueError("--level-softmax needs ModelConfig.code_sizes (train.py sets them from the SID table)")
        edges = list(itertools.accumulate(sizes, initial=model.cfg.vocab_size - sum(sizes)))
        t = torch.arange(logits.size(-1), device=logits.device)
        own = torch.stack([(t >= lo) & (t < hi) for lo, hi in zip(edges, edges[1:])])  # (L, V)
        logits = logits.masked_fill(~own, -math.inf)
    return logits


def objective(model, h, batch):
    """Training loss from the states h (B, L, D) that predict the target's L codes: the next-SID NLL,
    plus lambda times MAP's mean over depths. -> (loss, detached statistics for the log)"""
    main = F.cross_entropy(code_logits(model, h).flatten(0, 1), batch["labels"].flatten())
    stats = {"loss_main": main.detach()}
    if model.map is None:
        return main, stats
    aux, aux_stats = losses(model, h, batch)
    return main + model.cfg.map_weight * aux, {**stats, **aux_stats}
