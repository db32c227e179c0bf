"""Metrics on hand-computed cases; constrained beam search against scoring every item."""
import math

import numpy as np
import pytest
import torch

from data import SEP, Tokens
from evaluate import EvalConfig, Prefixes, metrics, popularity, rank_items
from model import ModelConfig, build_model


def test_metrics_hand_computed():
    ranked = torch.tensor([[3, 7, 1, 9, 4, 5], [2, 8, 6, 0, 11, 12], [5, 4, 3, 2, 1, 0]])
    target = torch.tensor([7, 12, 42])  # rank 2, rank 6, missing
    m = metrics(ranked, target, ks=(1, 5, 6))
    assert m["recall@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["recall@5"] == pytest.approx(1 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3)) / 3)
    assert m["recall@6"] == pytest.approx(2 / 3)
    assert m["ndcg@6"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(7)) / 3)
    assert set(metrics(ranked, target)) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}


def test_popularity_recommends_the_most_frequent_items():
    m = popularity([np.array([1, 1, 2]), np.array([1, 3])], np.array([1, 3]), n_items=5, k=2)
    assert m["recall@5"] == pytest.approx(0.5)  # top-2 is (1, 2): user 0 hits at rank 1, user 1 misses


CODES = np.array([[0, 1, 0], [0, 1, 1], [0, 2, 0], [1, 0, 0], [1, 3, 0], [2, 2, 0], [2, 2, 1], [2, 2, 2],
                  [3, 0, 0], [3, 1, 0], [1, 1, 0], [0, 0, 0]])  # 12 items, 4 x 4 codes + disambiguation
SIZES = [4, 4, 3]


def test_prefixes_only_lead_to_real_items():
    p = Prefixes(CODES, SIZES)
    assert p.child[0].tolist() == [[0, 1, 2, 3]]  # every first code is used
    for item, (a, b, c) in enumerate(CODES):
        l1 = p.child[0][0, a]
        l2 = p.child[1][l1, b]
        assert p.item[p.child[2][l2, c]] == item
    assert (p.child[1] >= 0).sum() == len({tuple(r[:2]) for r in CODES})


def allowed(tokens, norm):
    """(n, L, V) bool: the tokens each item's code l is normalised over, for --beam-norm `norm`."""
    n, L, V = len(CODES), tokens.n_codes, tokens.vocab_size
    out = torch.full((n, L, V), norm == "vocab")
    for i, sid in enumerate(CODES):
        for l in range(L if norm != "vocab" else 0):
            for c in range(SIZES[l]):
                leads = any((other[:l] == sid[:l]).all() and other[l] == c for other in CODES)
                out[i, l, tokens.offsets[l] + c] = norm == "level" or (norm == "valid" and leads)
    return out


def brute_force(model, tokens, hist, length, norm="vocab"):
    """Log-probability of every item's full SID, scored by teacher forcing."""
    n, L = len(CODES), tokens.n_codes
    items = torch.arange(n)
    own = allowed(tokens, norm)
    scores = []
    for h, ln in zip(hist, length):
        hh = h[None].expand(n, -1)
        if model.cfg.arch == "t5":
            b = tokens.t5(hh, items)
            logits = model(b["enc"], b["enc_mask"], b["dec"])
        else:
            prompt = tokens.qwen_prompt(hh, ln.expand(n))
            ids, mask = prompt["ids"], prompt["mask"]
            ids = torch.cat([ids, tokens.item_tokens[items][:, :-1]], 1)
            mask = torch.cat([mask, torch.ones(n, L - 1, dtype=torch.bool)], 1)
            logits = model(ids, mask)[:, -L:]
        lp = logits.masked_fill(~own, -math.inf).log_softmax(-1).gather(2, tokens.item_tokens[items][..., None]).squeeze(-1)
        scores.append(lp.sum(1))
    return torch.stack(scores)


@pytest.mark.parametrize("arch", ["t5", "qwen"])
@pytest.mark.parametrize("beam", [12, 16])
@pytest.mark.parametrize("norm", ["vocab", "level", "valid"])
def test_wide_beam_equals_scoring_every_item(arch, beam, norm):
    torch.manual_seed(0)
    tokens = Tokens(CODES, SIZES)
    cfg = ModelConfig(arch=arch, vocab_size=tokens.vocab_size, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=2,
                      head_dim=16, d_ff=64, dropout=0.0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # sharpen the model so that rankings are not near-ties
        model.lm_head.weight.mul_(8.0)
    hist = torch.tensor([[3, 5, 1, -1], [0, -1, -1, -1], [11, 10, 9, 8], [2, 2, -1, -1]])
    length = (hist >= 0).sum(1)
    ranked = rank_items(model, tokens, Prefixes(CODES, SIZES), hist, length, EvalConfig(beam, 3, norm))
    with torch.no_grad():
        expected = brute_force(model, tokens, hist, length, norm).argsort(1, descending=True)
    assert torch.equal(ranked[:, :12], expected)
    assert (ranked[:, 12:] == -1).all()  # a beam wider than the catalogue pads with -1


def test_beam_returns_distinct_real_items():
    torch.manual_seed(1)
    tokens = Tokens(CODES, SIZES)
    model = build_model(ModelConfig(arch="qwen", vocab_size=tokens.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                    head_dim=16, d_ff=64, dropout=0.0)).eval()
    hist = torch.randint(0, 12, (20, 5))
    ranked = rank_items(model, tokens, Prefixes(CODES, SIZES), hist, torch.full((20,), 5), EvalConfig(beam=5))
    assert ranked.shape == (20, 5) and ((ranked >= 0) & (ranked < 12)).all()
    assert all(len(set(r.tolist())) == 5 for r in ranked)


def test_token_layouts_round_trip_to_items():
    tokens = Tokens(CODES, SIZES)
    hist = torch.tensor([[4, 7, -1], [1, 2, 3]])
    length = torch.tensor([2, 3])
    target = torch.tensor([9, 0])
    item_of = {tuple(r): i for i, r in enumerate(tokens.item_tokens[:-1].tolist())}
    t5 = tokens.t5(hist, target)
    enc = t5["enc"].view(2, 3, 4)  # 3 items x (3 codes + separator)
    assert [item_of[tuple(enc[0, j, :3].tolist())] for j in range(2)] == [4, 7]
    assert (enc[0, :2, 3] == SEP).all() and not t5["enc_mask"][0, 8:].any()
    assert [item_of[tuple(r)] for r in t5["labels"].tolist()] == [9, 0]
    q = tokens.qwen(hist, length, target)
    for b in range(2):
        ids = q["ids"][b]
        n = int(length[b]) * 3
        assert [item_of[tuple(ids[i:i + 3].tolist())] for i in range(0, n, 3)] == hist[b, :length[b]].tolist()
        assert ids[n] == SEP
        assert item_of[tuple(ids[n + 1:n + 4].tolist())] == target[b]
        assert q["pred_pos"][b].tolist() == [n, n + 1, n + 2]
    prompt = tokens.qwen_prompt(hist, length)
    ids, mask = prompt["ids"], prompt["mask"]
    assert prompt["prior"][0, :3].eq(-math.inf).all() and prompt["prior"][0, -1] == math.inf
    assert ids[0, :3].tolist() == [0, 0, 0] and not mask[0, :3].any() and ids[0, -1] == SEP
    assert item_of[tuple(ids[0, 3:6].tolist())] == 4
