"""DistributedDataParallel on the CPU: two processes on the gloo backend, as torchrun starts them."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as D
import torch.multiprocessing as mp

import dist
from data import Tokens
from evaluate import EvalConfig, Prefixes, evaluate
from model import ModelConfig, build_model
from step import Step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODES = np.array([[a, b, c] for a in range(3) for b in range(3) for c in range(2)])  # 18 items
USERS = 37  # not a multiple of the world size: one rank gets one user more


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="t5", vocab_size=3 + 3 + 3 + 2, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=2,
                      head_dim=16, d_ff=64, dropout=0.0)
    return build_model(cfg)


def epoch_list(n_batches=11, batch=4, seed=0):
    """An epoch's shuffled batches as train.py makes them: (sample indices, history length)."""
    perm = torch.randperm(n_batches * batch, generator=torch.Generator().manual_seed(seed))
    return [(chunk, 3) for chunk in perm.split(batch)]


def make_batch(tokens, idx):
    g = torch.Generator().manual_seed(int(idx.sum()))
    hist = torch.randint(0, len(CODES), (len(idx), 3), generator=g)
    return tokens.t5(hist, torch.randint(0, len(CODES), (len(idx),), generator=g))


def users():
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(0, len(CODES), (USERS, 4), generator=g)
    length = torch.randint(1, 5, (USERS,), generator=g)
    hist[torch.arange(4)[None] >= length[:, None]] = -1  # left-aligned, -1 padded
    return hist.numpy(), length.numpy(), torch.randint(0, len(CODES), (USERS,), generator=g).numpy()


def worker(rank, world, port, out, accum):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    assert dist.init() == (rank, world) and D.get_backend() == "gloo"
    tokens = Tokens(CODES, [3, 3, 2])
    model = tiny_model()
    step = Step(model, lr=1e-2, weight_decay=0.0, clip=1.0, device=torch.device("cpu"), accum=accum)
    assert step.distributed and not step.graph
    epoch, seen = epoch_list(), []
    for start in range(0, len(epoch) - world * accum + 1, world * accum):  # as train.py walks an epoch
        mine = dist.my_batches(epoch, start, accum)
        seen += [int(i) for idx, _ in mine for i in idx]
        step([make_batch(tokens, idx) for idx, _ in mine])
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [None] * world
    D.all_gather_object(everyone, (seen, params))
    hist, length, target = users()
    shard = list(range(USERS))[dist.shard(USERS)]
    shards = [None] * world
    D.all_gather_object(shards, shard)
    m = evaluate(model, tokens, Prefixes(CODES, [3, 3, 2]), hist, length, target, EvalConfig(beam=10, eval_batch=8))
    if rank == 0:
        torch.save({"seen": [s for s, _ in everyone], "params": [p for _, p in everyone], "shards": shards,
                    "metrics": m}, out)
    dist.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "ranks.pt")
    mp.spawn(worker, args=(2, free_port(), out, 2), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def test_ranks_train_on_disjoint_shards_that_cover_the_epoch(two_ranks):
    a, b = two_ranks["seen"]
    assert a and b and not set(a) & set(b)
    epoch = epoch_list()
    used = 4 * (len(epoch) // 4)  # whole steps of 2 ranks x 2 micro-batches; the rest waits for a later epoch
    assert sorted(a + b) == sorted(int(i) for idx, _ in epoch[:used] for i in idx)


def test_gradients_are_averaged_across_ranks(two_ranks):
    p0, p1 = two_ranks["params"]
    assert torch.equal(p0, p1)  # the same weights on every rank after every step
    # and they are those of one process that accumulates the same four micro-batches per step
    tokens, model = Tokens(CODES, [3, 3, 2]), tiny_model()
    step = Step(model, lr=1e-2, weight_decay=0.0, clip=1.0, device=torch.device("cpu"), accum=4)
    epoch = epoch_list()
    for start in range(0, len(epoch) - 3, 4):
        step([make_batch(tokens, idx) for idx, _ in epoch[start:start + 4]])
    single = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(single, torch.cat([p.detach().flatten() for p in tiny_model().parameters()]))
    torch.testing.assert_close(p0, single, rtol=1e-5, atol=1e-6)


def test_sharded_evaluation_counts_every_user_once(two_ranks):
    s0, s1 = two_ranks["shards"]
    assert sorted(s0 + s1) == list(range(USERS)) and not set(s0) & set(s1)
    # the metrics of the DDP model equal one process evaluating all users with the same weights
    model = tiny_model()
    torch.nn.utils.vector_to_parameters(two_ranks["params"][0], model.parameters())
    hist, length, target = users()
    single = evaluate(model, Tokens(CODES, [3, 3, 2]), Prefixes(CODES, [3, 3, 2]), hist, length, target,
                      EvalConfig(beam=10, eval_batch=8))
    assert two_ranks["metrics"] == pytest.approx(single, rel=1e-6)  # float32 means, summed in another order
    assert 0 < single["recall@5"] < 1  # a non-trivial case: some users hit, some miss


TINY = ["--data", "synthetic", "--synthetic-users", "300", "--synthetic-items", "120", "--device", "cpu",
        "--preset", "tiny", "--codebook-size", "8", "--batch-size", "32", "--eval-every", "4", "--warmup-steps", "2",
        "--log-every", "2"]


def test_torchrun_trains_and_a_single_process_resumes_its_run(tmp_path):
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *TINY, "--max-steps", "8", "--out", out]
    r = subprocess.run(two, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done:") == 1  # only rank 0 prints the summary
    assert "DDP over 2 processes" in r.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [rec["step"] for rec in log] == [4, 8]
    assert log[-1]["samples_s"] > 0 and json.load(open(os.path.join(out, "results.json")))["steps"] == 8
    # the checkpoint's place in the data means the same on one rank: resume it there for 4 more steps
    one = [sys.executable, "train.py", *TINY, "--max-steps", "12", "--out", out, "--resume"]
    r = subprocess.run(one, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stdout and json.load(open(os.path.join(out, "results.json")))["steps"] == 12


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_stamp_trains_under_ddp(arch, tmp_path):
    # SAP and MAP inside DDP: every parameter gets a gradient at every step (DDP fails the step
    # after one that left a parameter out), and pruned shapes stay static across ranks.
    out = str(tmp_path / arch)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *TINY, "--arch", arch, "--keep", "0.5", "--map-steps", "2", "--max-steps", "3", "--out", out]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(os.path.join(out, "results.json")))
    assert result["steps"] == 3 and all(math.isfinite(result[k]) for k in ("recall@5", "ndcg@10"))
