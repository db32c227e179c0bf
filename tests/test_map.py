"""MAP: future targets from the training part only, exact baseline at depth 0, heads unused at inference."""
import numpy as np
import pytest
import torch

from data import DataConfig, Dataset, Tokens, load_dataset, split
from evaluate import EvalConfig, Prefixes, rank_items
from map import IGNORE, future_items, targets
from model import ModelConfig, build_model

CODES = torch.tensor([[a, b, c] for a in range(3) for b in range(3) for c in range(2)])  # 18 items
TOKENS = Tokens(CODES, [3, 3, 2])


def make(arch, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=TOKENS.vocab_size, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=4, head_dim=8,
               d_ff=64, dropout=0.0, n_kv_heads=2 if arch == "qwen" else 0)
    return build_model(ModelConfig(arch=arch, **{**cfg, **kw}))


def batch(arch, steps=2):
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, 18, (5, 6), generator=g)
    length = torch.tensor([6, 3, 5, 1, 4])
    hist[torch.arange(6)[None] >= length[:, None]] = -1
    target = torch.randint(0, 18, (5,), generator=g)
    b = TOKENS.t5(hist, target) if arch == "t5" else TOKENS.qwen(hist, length, target)
    future = torch.randint(0, 18, (5, steps), generator=g)
    future[1, 1:] = future[3] = -1  # user 1 has one future item, user 3 none
    return {**b, **targets(TOKENS, future)}


def hand_split():
    ds = Dataset("hand", [np.array([0, 1, 2, 3, 4, 5, 6]), np.array([7, 8, 9, 10]), np.array([11, 12, 13])],
                 [{"title": str(i)} for i in range(14)], [str(i) for i in range(14)])
    return ds, split(ds, DataConfig(max_items=30))


def test_future_items_on_a_hand_made_sequence():
    _, sp = hand_split()
    # user 0: training part 0..4 (5 is validation, 6 test); user 1: 7, 8; user 2: 11 only (no sample)
    fut = future_items(sp, 3)
    rows = {(int(u), int(t)): f.tolist() for u, t, f in zip(sp.train_user, sp.train_target, fut)}
    assert rows == {(0, 1): [2, 3, 4], (0, 2): [3, 4, -1], (0, 3): [4, -1, -1], (0, 4): [-1, -1, -1],
                    (1, 8): [-1, -1, -1]}


def test_no_validation_or_test_item_is_ever_an_auxiliary_target():
    ds = load_dataset(DataConfig(data="synthetic", synthetic_users=300))
    sp = split(ds, DataConfig(data="synthetic"))
    fut = future_items(sp, 4)
    for row, (u, p) in enumerate(zip(sp.train_user, sp.train_pos)):
        seq = ds.sequences[u]
        for d in range(4):
            if fut[row, d] >= 0:
                assert p + d + 1 <= len(seq) - 3  # inside the training part
                assert fut[row, d] == seq[p + d + 1]
            else:
                assert p + d + 1 > len(seq) - 3


def test_targets_ignore_missing_futures():
    t = targets(TOKENS, torch.tensor([[4, -1]]))
    assert (t["map_labels"][0, 1] == IGNORE).all() and (t["map_labels"][0, 0] >= 0).all()
    assert t["map_dec"][0, 0, 1:].tolist() == t["map_labels"][0, 0, :-1].tolist()


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_map_leaves_the_main_loss_and_depth_zero_is_the_baseline(arch):
    b = batch(arch)
    base = make(arch)
    loss0, stats0 = base.loss(b)
    loss0.backward()
    assert set(stats0) == {"loss_main"} and base.map is None
    assert torch.equal(loss0, stats0["loss_main"])
    with_map = make(arch, map_steps=2, map_weight=0.7)
    missing, unexpected = with_map.load_state_dict(base.state_dict(), strict=False)
    assert all(k.startswith("map.") for k in missing) and not unexpected
    loss, stats = with_map.loss(b)
    assert torch.equal(stats["loss_main"], loss0)  # the main path is untouched
    aux = (stats["loss_map1"] + stats["loss_map2"]) / 2
    assert torch.allclose(loss, loss0 + 0.7 * aux)


@pytest.mark.parametrize("arch", ["t5", "qwen"])
@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("head", ["linear", "block"])
def test_map_trains_every_head_with_finite_losses(arch, kind, head):
    model = make(arch, map_steps=3, map_kind=kind, map_head=head)
    b = batch(arch, steps=3)
    b["map_labels"][:, 2] = IGNORE  # a depth with no future at all in this batch
    loss, stats = model.loss(b)
    loss.backward()
    assert torch.isfinite(loss) and stats["loss_map3"] == 0 and 0 <= stats["acc_map1"] <= 1
    for name, p in model.named_parameters():
        # depth 3 had nothing to learn from; the embedding half of a projection starts at zero, so
        # its norm gets no gradient until the projection has moved
        if name.startswith("map.") and ".2" not in name and "norm_e" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_generation_never_calls_the_heads(arch, monkeypatch):
    model = make(arch, map_steps=2).eval()

    def fail(*args):
        raise AssertionError("MAP head called at inference")

    monkeypatch.setattr(model.map, "forward", fail)
    hist = torch.randint(0, 18, (4, 5))
    ranked = rank_items(model, TOKENS, Prefixes(CODES, [3, 3, 2]), hist, torch.full((4,), 5), EvalConfig(beam=4))
    assert ((ranked >= 0) & (ranked < 18)).all()


def test_negative_map_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="--map-steps -1 is negative"):
        ModelConfig(map_steps=-1)
