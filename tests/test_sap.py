"""SAP: the pruning invariants, the column sums against an explicit softmax, both models end to end."""
import dataclasses
import math

import pytest
import torch

import sap
from data import Tokens
from evaluate import EvalConfig, Prefixes, rank_items
from model import ModelConfig, RelativeBias, build_model

CFG = dict(vocab_size=60, d_model=32, n_layers=4, n_decoder_layers=2, n_heads=4, head_dim=8, d_ff=64)


def make(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, n_kv_heads=2 if arch == "qwen" else 0, **{**CFG, **kw}))


def t5_batch(B=4, S=30):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 20:] = mask[3, 9:] = False
    enc = torch.randint(3, 60, (B, S), generator=g).masked_fill(~mask, 0)
    return {"enc": enc, "enc_mask": mask, "dec": torch.randint(3, 60, (B, 4), generator=g),
            "labels": torch.randint(3, 60, (B, 4), generator=g)}


def qwen_batch(B=4):
    codes = torch.randint(0, 8, (20, 3), generator=torch.Generator().manual_seed(2))
    tokens = Tokens(codes, [8, 8, 8])
    hist = torch.randint(0, 20, (B, 9), generator=torch.Generator().manual_seed(3))
    length = torch.tensor([9, 4, 7, 1])[:B]
    hist[torch.arange(9)[None] >= length[:, None]] = -1
    return tokens.qwen(hist, length, torch.randint(0, 20, (B,))), tokens


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_keep_one_never_runs_the_pruning_code(arch, monkeypatch):
    batch = t5_batch() if arch == "t5" else qwen_batch()[0]
    model = make(arch, dropout=0.1).train()
    torch.manual_seed(5)
    ref, _ = model.loss(batch)
    ref.backward()
    ref_grads = grads(model)

    def fail(*args):
        raise AssertionError("SAP ran at keep=1")

    monkeypatch.setattr(sap, "prune", fail)
    monkeypatch.setattr(sap, "column_sums", fail)
    model.zero_grad()
    torch.manual_seed(5)
    loss, _ = model.loss(batch)
    loss.backward()
    assert torch.equal(loss, ref) and all(torch.equal(a, b) for a, b in zip(grads(model), ref_grads))


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_pruning_that_keeps_every_token_equals_no_pruning(arch, monkeypatch):
    batch = t5_batch() if arch == "t5" else qwen_batch()[0]
    monkeypatch.setattr(sap, "prunes", lambda *a: True)  # run the pruning path even where k = T
    runs = []
    for keep in (1.0, 0.99999):  # 0.99999 runs the whole pruning path yet keeps every token
        model = make(arch, dropout=0.1, keep=keep).train()
        torch.manual_seed(5)  # same dropout masks
        loss, _ = model.loss(batch)
        loss.backward()
        runs.append((loss.detach(), dict(model.named_parameters())))
    (l0, p0), (l1, p1) = runs
    assert torch.equal(l0, l1)  # logits and loss: bit for bit
    for name in p0:
        a, b = p0[name].grad, p1[name].grad
        if name == "enc_bias.emb.weight":  # rebuilt after the pruning point: its gradient sums in another order
            assert ((a - b).norm() / a.norm()).item() < 1e-6
        else:
            assert torch.equal(a, b), name


def padded(arch, h):
    """The same four samples (histories of 6, 3, 5 and 1 items of 3 codes, cut at h) padded to h items."""
    codes = torch.randint(0, 8, (20, 3), generator=torch.Generator().manual_seed(2))
    tokens = Tokens(codes, [8, 8, 8])
    length = torch.tensor([6, 3, 5, 1]).clamp(max=h)
    hist = torch.randint(0, 20, (4, 10), generator=torch.Generator().manual_seed(3))[:, :h]
    hist[torch.arange(h)[None] >= length[:, None]] = -1
    target = torch.tensor([4, 9, 0, 17])
    return tokens.qwen(hist, length, target) if arch == "qwen" else tokens.t5(hist, target)


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_what_a_sample_keeps_does_not_depend_on_its_padding(arch, monkeypatch):
    per_item = 4 if arch == "t5" else 3  # t5: 3 codes and a separator
    real = torch.tensor([6, 3, 5, 1]) * per_item + (0 if arch == "t5" else 4)  # qwen: separator and target too
    kept = []
    monkeypatch.setattr(sap, "prune", lambda *a, f=sap.prune: (lambda out: kept.append(out[0]) or out)(f(*a)))
    losses, sets = {}, {}
    for sap_len in (10 * per_item, 0):  # a fraction of a 10-item history (train.py), or of each batch's length
        model = make(arch, vocab_size=3 + 24, dropout=0.0, keep=0.4, prune_layer=1, sap_len=sap_len).train()
        for h in (6, 10):  # a length bucket of 6 items, or every batch padded to the longest history (GRID)
            losses[sap_len, h] = model.loss(padded(arch, h))[0]
            sets[sap_len, h] = [set(row[row < n].tolist()) for row, n in zip(kept[-1], real)]  # real tokens kept
    assert len(kept) == 4  # every batch was pruned: the 6-item history is longer than k = 16 or 12 tokens
    assert sets[10 * per_item, 6] == sets[10 * per_item, 10]
    assert torch.allclose(losses[10 * per_item, 6], losses[10 * per_item, 10], rtol=1e-5, atol=0)
    assert sets[0, 6] != sets[0, 10]  # k from each batch's length: the 6-item bucket keeps fewer
    assert all(a <= b for a, b in zip(sets[0, 6], sets[0, 10]))


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_histories_shorter_than_k_skip_pruning(arch, monkeypatch):
    batch = padded(arch, 3)  # at most 3 items: 12 (t5) or 9 (qwen) candidates; k = 16 or 12 of a 10-item history
    per_item = 4 if arch == "t5" else 3
    ref = make(arch, vocab_size=3 + 24, dropout=0.0).train().loss(batch)[0]

    def fail(*args):
        raise AssertionError("SAP ran where nothing would be dropped")

    monkeypatch.setattr(sap, "column_sums", fail)
    model = make(arch, vocab_size=3 + 24, dropout=0.0, keep=0.4, sap_len=10 * per_item).train()
    assert torch.equal(model.loss(batch)[0], ref)


def test_prune_keeps_order_and_moves_masks_and_positions_with_tokens():
    cfg = ModelConfig(keep=0.4)
    B, T, D = 3, 10, 5
    x = torch.randn(B, T, D)
    colsum = torch.rand(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 6:] = False
    pos = torch.arange(T)[None] * 10  # distinguishable positions
    idx, xk, pk, mk = sap.prune(cfg, x, colsum, sap.prior_from_mask(mask), 0, pos, mask)
    assert idx.shape == (B, sap.n_kept(cfg, T, 0)) == (B, 4)
    assert (idx[:, 1:] > idx[:, :-1]).all()  # ascending: order kept
    assert torch.equal(xk, x[torch.arange(B)[:, None], idx])
    assert torch.equal(pk, pos.expand(B, T).gather(1, idx)) and torch.equal(mk, mask.gather(1, idx))
    compact = sap.prune(dataclasses.replace(cfg, sap_positions="compact"), x, colsum, sap.prior_from_mask(mask), 0, pos)
    assert torch.equal(compact[2], torch.arange(4).expand(B, 4))


def test_ascending_gives_the_sorted_indices_at_every_k():
    g = torch.Generator().manual_seed(4)
    for k in range(1, 31):
        top = torch.randn(5, 30, generator=g).topk(k, dim=1).indices
        assert torch.equal(sap.ascending(top, 30), top.sort(dim=1).values)


def test_relative_bias_of_kept_tokens_equals_the_bias_of_their_positions():
    rel = make("t5").enc_bias
    pos = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i))[:12].sort().values
                       for i in range(3)])
    picked = RelativeBias.select(rel(torch.arange(30)[None], torch.arange(30)[None]), pos)
    direct = rel(pos, pos)
    assert picked.shape == (3, CFG["n_heads"], 12, 12) and torch.allclose(picked, direct)
    w = torch.randn(direct.shape)
    g1 = torch.autograd.grad((picked * w).sum(), rel.emb.weight)[0]
    g2 = torch.autograd.grad((direct * w).sum(), rel.emb.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


@pytest.mark.parametrize("score", sap.SCORES)
def test_padding_is_never_kept_while_a_real_token_is_dropped(score):
    torch.manual_seed(0)
    cfg = ModelConfig(keep=0.5, sap_score=score)
    B, T = 64, 12
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1))
    idx, *_ = sap.prune(cfg, torch.randn(B, T, 4), torch.rand(B, T), sap.prior_from_mask(mask), 0, torch.arange(T)[None])
    kept = torch.zeros(B, T, dtype=torch.bool).scatter(1, idx, True)
    dropped_real = (mask & ~kept).any(1)
    kept_pad = (~mask & kept).any(1)
    assert not (dropped_real & kept_pad).any()
    assert kept.sum(1).eq(6).all()


def explicit_column_sums(q, k, scale, bias, query_valid):
    k = k.repeat_interleave(q.size(1) // k.size(1), 1)
    a = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale + bias.double(), -1)  # (B, H, T, S)
    return torch.einsum("bhts,bt->bs", a, query_valid.double())


@pytest.mark.parametrize("kind", ["float", "bool", "causal"])
def test_column_sums_equal_an_explicit_softmax(kind):
    torch.manual_seed(0)
    B, H, Hkv, T, d = 3, 4, 2, 7, 8
    q, k = torch.randn(B, H, T, d), torch.randn(B, Hkv, T, d)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 5:] = False
    if kind == "float":  # T5: relative bias plus key padding
        mask = torch.randn(1, H, T, T) + torch.zeros(B, 1, 1, T).masked_fill(~valid[:, None, None], -1e9)
        bias = mask
    elif kind == "bool":  # Qwen with a padding mask
        mask = valid[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
        bias = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    else:  # Qwen training: no mask, causal
        mask, bias = None, torch.zeros(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    got = sap.column_sums(q, k, 0.3, mask, kind == "causal", valid)
    ref = explicit_column_sums(q, k, 0.3, bias, valid)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_causal_norm_divides_by_the_queries_that_see_each_token():
    valid = torch.tensor([[True, True, True, False]])
    x = torch.ones(1, 4, 2)
    s = sap.importance("attn", x, torch.tensor([[6.0, 4.0, 2.0, 0.0]]), valid, 0.5, causal_norm=True)
    assert s.tolist() == [[2.0, 2.0, 2.0, 0.0]]  # 3, 2 and 1 real queries see tokens 0, 1, 2


def test_qwen_never_drops_the_separator_or_the_target(monkeypatch):
    batch, _ = qwen_batch()
    kept = []
    prune = sap.prune

    def recording(*args):
        out = prune(*args)
        kept.append(out[0])
        return out

    monkeypatch.setattr(sap, "prune", recording)
    model = make("qwen", keep=0.25).train()
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss)
    idx = kept[0]
    sep = batch["pred_pos"][:, 0]
    for b in range(idx.size(0)):
        must = set(range(int(sep[b]), int(sep[b]) + 4))  # separator and the 3 target tokens
        assert must <= set(idx[b].tolist())


@pytest.mark.parametrize("arch", ["t5", "qwen"])
@pytest.mark.parametrize("score", sap.SCORES)
def test_pruned_training_has_finite_loss_and_gradients_reach_the_embeddings(arch, score):
    batch = t5_batch() if arch == "t5" else qwen_batch()[0]
    model = make(arch, keep=0.33, sap_score=score, sap_causal_norm=arch == "qwen").train()
    loss, _ = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    ids = batch["enc"] if arch == "t5" else batch["ids"]
    used = ids.unique()
    assert (model.embed.weight.grad[used[used != 0]].abs().sum(1) > 0).all()


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_pruning_at_evaluation_is_off_by_default_and_works_when_asked(arch):
    codes = torch.tensor([[a, b, 0] for a in range(4) for b in range(4)])
    tokens = Tokens(codes, [4, 4, 1])
    hist = torch.randint(0, 16, (6, 8), generator=torch.Generator().manual_seed(0))
    length = torch.full((6,), 8)
    out = {}
    for sap_eval in (False, True):
        model = make(arch, vocab_size=tokens.vocab_size, keep=0.3, sap_eval=sap_eval).eval()
        out[sap_eval] = rank_items(model, tokens, Prefixes(codes, [4, 4, 1]), hist, length, EvalConfig(beam=5))
    unpruned = rank_items(make(arch, vocab_size=tokens.vocab_size).eval(), tokens, Prefixes(codes, [4, 4, 1]), hist,
                          length, EvalConfig(beam=5))
    assert torch.equal(out[False], unpruned)  # same weights, keep < 1, but no pruning at evaluation
    assert ((out[True] >= 0) & (out[True] < 16)).all() and not torch.equal(out[True], unpruned)
