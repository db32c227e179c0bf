"""Constrained beam search over semantic IDs, and Recall@K / NDCG@K with leave-one-out.

    python evaluate.py out/<run>          # evaluate a saved run on validation and test

The beam search runs on the GPU for a whole batch of users at once. The valid SID prefixes are
index tensors (`Prefixes.child[l][p, c]`: the prefix that code c extends prefix p to at level l, or
-1), so each decoding step is one gather and one mask: beams only ever reach real items.
"""
import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import dist
from data import BOS
from model import KVCache


@dataclass
class EvalConfig:
    beam: int = field(default=10, metadata={"help": "beam width of the constrained beam search (top-K returned)"})
    eval_batch: int = field(default=1024, metadata={"help": "users decoded at once (lower it if evaluation runs out "
                                                             "of GPU memory)"})
    beam_norm: str = field(default="vocab", metadata={"help": "each code's probability in a beam's score: softmax over "
                                                              "the whole vocabulary, its level's codes (level), or the "
                                                              "codes that lead to an item (valid, as GRID)"})

    def __post_init__(self):
        if self.beam_norm not in ("vocab", "level", "valid"):
            raise ValueError(f"unknown --beam-norm '{self.beam_norm}': use vocab, level or valid")
        if self.beam < 1 or self.eval_batch < 1:
            raise ValueError(f"--beam {self.beam} and --eval-batch {self.eval_batch} must be at least 1: the beam is "
                             "the number of items returned per user (10 for Recall@10)")


def metrics(ranked, target, ks=(5, 10)):
    """ranked (B, K) item indices best first, target (B,) -> {"recall@k", "ndcg@k"} averaged over users.
    One relevant item: Recall@k is a hit in the top k, NDCG@k is 1 / log2(rank + 1) for a hit at rank."""
    hit = ranked == target[:, None]  # (B, K), at most one True per row
    rank = torch.arange(1, ranked.size(1) + 1, device=ranked.device)
    gain = hit.float() / torch.log2(rank.float() + 1)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = hit[:, :k].any(1).float().mean().item()
        out[f"ndcg@{k}"] = gain[:, :k].sum(1).mean().item()
    return out


class Prefixes:
    """The valid prefixes of a SID table, level by level, as dense index tensors.

    Prefixes of length l are numbered 0 .. n_l - 1 (np.unique over the first l codes); child[l] is
    (n_l, size_l): the number of the extended prefix, -1 where no item continues that way. A full
    SID is one item, so the prefixes of length L number the items (item[p])."""

    def __init__(self, codes, sizes, device="cpu"):
        codes = np.asarray(codes)
        n, L = codes.shape
        ids = [np.zeros(n, np.int64)]  # prefix number of every item at each length
        for l in range(1, L + 1):
            ids.append(np.unique(codes[:, :l], axis=0, return_inverse=True)[1].reshape(-1))
        self.child = []
        for l in range(L):
            table = np.full((ids[l].max() + 1, sizes[l]), -1, np.int64)
            table[ids[l], codes[:, l]] = ids[l + 1]
            self.child.append(torch.as_tensor(table, device=device))
        item = np.empty(n, np.int64)
        item[ids[L]] = np.arange(n)
        self.item = torch.as_tensor(item, device=device)


@torch.no_grad()
def beam_search(decoding, prefixes, offsets, beam, norm="vocab"):
    """Top-`beam` items per user by the model's log-probability of their full SID: the sum of each
    code's log-softmax over the whole vocabulary (norm vocab), over its level's codes (level) or over
    the codes that continue the prefix to a real item (valid); invalid continuations are masked.
    Returns (B, beam) items (-1 where the catalogue has fewer items than the beam) and their scores."""
    logits = decoding.start().float()[:, None]  # (B, 1, V): one beam per user
    B = logits.size(0)
    prefix = torch.zeros(B, 1, dtype=torch.long, device=logits.device)
    score = torch.zeros(B, 1, device=logits.device)
    for l, child in enumerate(prefixes.child):
        size = child.size(1)
        nxt = child[prefix.clamp(min=0)]  # (B, k, size): where each code leads, -1 = no item
        logp = (logits.log_softmax(-1) if norm == "vocab" else logits)[..., offsets[l]:offsets[l] + size]
        if norm == "valid":  # every prefix has a valid continuation, so no row is all -inf
            logp = logp.masked_fill(nxt < 0, -math.inf)
        if norm != "vocab":
            logp = logp.log_softmax(-1)
        cand = (score[..., None] + logp).masked_fill(nxt < 0, -math.inf)
        k = cand.size(1)
        score, idx = cand.flatten(1).topk(min(beam, k * size), dim=1)  # (B, k')
        prefix = nxt.flatten(1).gather(1, idx).masked_fill(score == -math.inf, -1)
        if l + 1 < len(prefixes.child):
            rows = (torch.arange(B, device=idx.device)[:, None] * k + idx // size).flatten()
            tokens = (offsets[l] + idx % size).flatten()
            logits = decoding.step(rows, tokens).float().view(B, -1, logits.size(-1))
    items = prefixes.item[prefix.clamp(min=0)].masked_fill(prefix < 0, -1)
    return items, score


class T5Decoding:
    """Encode once; each step re-runs the (short) decoder over the chosen beams' prefixes."""

    def __init__(self, model, batch):
        self.model = model
        self.memory, self.mask = model.encode(batch["enc"], batch["enc_mask"])
        self.user = torch.arange(self.memory.size(0), device=self.memory.device)
        self.dec = torch.full((self.memory.size(0), 1), BOS, device=self.memory.device)

    def start(self):
        return self._logits()

    def step(self, rows, tokens):
        self.user, self.dec = self.user[rows], torch.cat([self.dec[rows], tokens[:, None]], 1)
        return self._logits()

    def _logits(self):
        h = self.model.decode(self.dec, self.memory[self.user], self.mask[self.user])
        return self.model.head(h[:, -1])


class QwenDecoding:
    """Read the history once into a KV cache; each step feeds one code per beam, the cache
    reordered to follow its beams."""

    def __init__(self, model, batch):
        self.model, self.cache = model, KVCache(model.cfg.n_layers)
        self.first = model.hidden(batch["ids"], batch["mask"], cache=self.cache, prior=batch["prior"], fixed=1)[:, -1]

    def start(self):
        return self.model.head(self.first)

    def step(self, rows, tokens):
        self.cache.reorder(rows)
        return self.model.head(self.model.hidden(tokens[:, None], cache=self.cache)[:, -1])


@torch.no_grad()
def rank_items(model, tokens, prefixes, hist, length, cfg, dtype=None):
    """Top-`cfg.beam` items for every row of (hist, length), in batches of users of similar length."""
    model.eval()
    device = tokens.item_tokens.device
    hist, length = torch.as_tensor(hist, device=device), torch.as_tensor(length, device=device)
    order = torch.argsort(length)
    ranked = torch.full((len(hist), cfg.beam), -1, dtype=torch.long, device=device)
    for chunk in order.split(cfg.eval_batch):
        h = hist[chunk, :int(length[chunk].max())]
        if model.cfg.arch == "t5":
            decoding = T5Decoding
            batch = tokens.t5(h)
        else:
            decoding = QwenDecoding
            batch = tokens.qwen_prompt(h, length[chunk])
        with torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None):
            items, _ = beam_search(decoding(model, batch), prefixes, tokens.offsets, cfg.beam, cfg.beam_norm)
        ranked[chunk, :items.size(1)] = items
    return ranked


def evaluate(model, tokens, prefixes, hist, length, target, cfg, dtype=None):
    """Metrics over the users (hist, length, target). Under torchrun each rank ranks its share of them
    and the totals are summed across ranks (dist.py): every user counts once, as on one GPU."""
    users = dist.shard(len(target))
    ranked = rank_items(model, tokens, prefixes, hist[users], length[users], cfg, dtype)
    return dist.mean_over_ranks(metrics(ranked, torch.as_tensor(target[users], device=ranked.device)), len(ranked))


def popularity(train_seqs, target, n_items, k=10):
    """The baseline every model must beat: recommend the most frequent training items to everyone."""
    counts = np.bincount(np.concatenate(train_seqs), minlength=n_items)
    top = torch.as_tensor(np.argsort(-counts, kind="stable")[:k])
    target = torch.as_tensor(target)
    return metrics(top.expand(len(target), -1), target)


def main(argv=None):
    from train import load_run  # the run folder's format belongs to train.py

    p = argparse.ArgumentParser(description="Evaluate a saved run on validation and test.")
    p.add_argument("run", help="run folder written by train.py (out/<run>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--beam", type=int, default=None, help="beam width (default: the run's)")
    p.add_argument("--beam-norm", default=None, help="vocab, level or valid (default: the run's; see train.py --help)")
    p.add_argument("--data-dir", default=None, help="where the run's dataset is (default: where it was trained)")
    p.add_argument("--sap-eval", action="store_true", help="SAP: prune at evaluation too, at the run's --keep "
                                                           "(a run trained with SAP evaluates unpruned by default)")
    args = p.parse_args(argv)
    run = load_run(args.run, torch.device(args.device), data_dir=args.data_dir)
    if args.sap_eval:
        if run.model.cfg.keep >= 1:
            sys.exit(f"--sap-eval: {args.run} was trained with --keep 1 (no pruning); use a run trained with --keep < 1")
        run.model.cfg.sap_eval = True
    cfg = dataclasses.replace(run.eval_cfg, **{k: v for k, v in (("beam", args.beam), ("beam_norm", args.beam_norm))
                                               if v is not None})
    if run.model.cfg.level_softmax and cfg.beam_norm == "vocab":
        sys.exit(f"--beam-norm vocab: {args.run} was trained with --level-softmax, which leaves scores across levels "
                 "untrained; use --beam-norm level or valid")
    for part in ("valid", "test"):
        sp = run.split
        hist, length, target = (getattr(sp, f"{part}_{x}") for x in ("hist", "len", "target"))
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = evaluate(run.model, run.tokens, run.prefixes, hist, length, target, cfg, run.dtype)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{part}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
              + f" | {len(target):,} users in {dt:.1f} s ({len(target) / dt:,.0f} users/s)")


if __name__ == "__main__":
    main()
