"""GPU checks of the fast training paths against the simple one (skipped without CUDA)."""
import pytest
import torch

from model import ModelConfig, build_model
from step import Step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small(arch, dropout, keep=1.0):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=300, d_model=64, n_layers=2, n_decoder_layers=2, n_heads=4,
                      n_kv_heads=2 if arch == "qwen" else 0, head_dim=16, d_ff=128, dropout=dropout, keep=keep,
                      prune_layer=1)
    return build_model(cfg).cuda().train()


def batches(arch, n, B=32, S=40):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        t = lambda *s: torch.randint(3, 300, s, generator=g).cuda()
        if arch == "t5":
            mask = torch.ones(B, S, dtype=torch.bool)
            mask[: B // 2, S // 2:] = False
            out.append({"enc": t(B, S), "enc_mask": mask.cuda(), "dec": t(B, 4), "labels": t(B, 4)})
        else:
            prior = torch.zeros(B, S)
            prior[:, S - 5:] = float("inf")  # separator and target always stay
            out.append({"ids": t(B, S), "pred_pos": torch.arange(S - 5, S - 1).expand(B, 4).contiguous().cuda(),
                        "labels": t(B, 4), "prior": prior.cuda()})
    return out


@cuda
@pytest.mark.parametrize("arch", ["t5", "qwen"])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("keep", [1.0, 0.4])
def test_graph_replay_trains_like_plain_steps(arch, compile, keep):
    data = batches(arch, 6)
    runs = []
    for graph in (False, True):
        model = small(arch, dropout=0.0, keep=keep)
        step = Step(model, lr=1e-3, weight_decay=0.01, clip=1.0, device=torch.device("cuda"), compile=compile,
                    graph=graph)
        losses = [float(step(b)[0]) for b in data]
        runs.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (l0, p0), (l1, p1) = runs
    assert l0 == pytest.approx(l1, rel=2e-2)
    assert ((p0 - p1).norm() / p0.norm()).item() < 1e-2


@cuda
def test_graph_replay_draws_new_dropout_masks():
    model = small("t5", dropout=0.3)
    step = Step(model, lr=0.0, weight_decay=0.0, clip=1.0, device=torch.device("cuda"), compile=True, graph=True)
    b = batches("t5", 1)[0]
    losses = {float(step(b)[0]) for _ in range(4)}  # same weights (lr 0), same batch: only dropout differs
    assert len(losses) == 4
