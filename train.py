"""Train a generative recommender on semantic IDs, then evaluate it with constrained beam search.

    python train.py --arch t5 --data beauty                 # GRID's T5 on Amazon Beauty (the paper's setting)
    python train.py --arch qwen --data beauty               # the decoder-only track
    python train.py --data synthetic --device cpu --preset tiny --epochs 5 --warmup-steps 100 --lr 3e-3 --codebook-size 8

Reads in order: configuration, set-up (device, precision, data, semantic IDs, model), the training
step, the loop (validation, early stopping, checkpoints), the final test. A run folder holds
config.json, log.jsonl (one line per evaluation), last.pt and best.pt, and results.json.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from data import DataConfig, Tokens, add_arguments, batches, describe, length_buckets, load_dataset, split
from evaluate import EvalConfig, Prefixes, evaluate, popularity
from map import future_items, targets
from model import ModelConfig, build_model
from sid import SIDConfig, SIDTable, build_sids
from sid import describe as describe_sids

PRESETS = {  # model sizes per architecture; flags given on the command line win
    # GRID's T5 (ModelConfig's defaults): 4 + 4 blocks, d 128, 6 heads of 64, d_ff 1024, dropout 0.15
    ("paper", "t5"): dict(),
    # decoder-only at about the T5's parameter count: 8 blocks, d 128, 6 query and 2 kv heads
    ("paper", "qwen"): dict(n_layers=8, n_kv_heads=2, dropout=0.1, rope_theta=10000.0),
    # a CPU smoke-test size: trains on synthetic data in a few minutes on two cores
    ("tiny", "t5"): dict(d_model=64, n_layers=2, n_decoder_layers=2, n_heads=4, head_dim=16, d_ff=256, dropout=0.0),
    ("tiny", "qwen"): dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=256, dropout=0.0,
                           rope_theta=10000.0),
}


@dataclass
class TrainConfig:
    batch_size: int = field(default=256, metadata={"help": "samples per optimiser step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (GRID: 1e-3)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    warmup_steps: int = field(default=500, metadata={"help": "linear learning-rate warm-up"})
    schedule: str = field(default="cosine", metadata={"help": "after warm-up: cosine (to 0 at the last epoch) or constant"})
    epochs: int = field(default=30, metadata={"help": "passes over the training samples (GRID stops within 10 of 512)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimiser steps (0: epochs decide)"})
    clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    eval_every: int = field(default=0, metadata={"help": "validate every N steps (0: once per epoch)"})
    patience: int = field(default=10, metadata={"help": "stop after this many validations without a better NDCG@10"})
    buckets: int = field(default=4, metadata={"help": "history-length buckets (static shapes for compile/graphs)"})
    sep: bool = field(default=True, metadata={"help": "t5: a separator token after each history item (GRID)"})
    preset: str = field(default="paper", metadata={"help": "model size: paper (GRID's T5 / a Qwen of its size) or "
                                                    "tiny (CPU smoke tests); size flags override it"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    compile: bool = field(default=True, metadata={"help": "torch.compile the training step (CUDA only)"})
    graph: bool = field(default=True, metadata={"help": "capture the whole step as a CUDA graph (CUDA only)"})
    out: str = field(default="", metadata={"help": "run folder (default: out/<data>-<arch>-seed<seed>)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh even if --out holds a run"})
    mem_snapshot: str = field(default="", metadata={"help": "record a CUDA memory snapshot of a few steps to this file"})
    log_every: int = field(default=50, metadata={"help": "refresh the progress bar every N steps"})

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown --schedule '{self.schedule}': use cosine or constant")


def precision(device):
    """(autocast dtype or None, whether a gradient scaler is needed, the reason, for the start-up log)."""
    if device.type != "cuda":
        return None, False, "fp32: no CUDA device"
    name, cap = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False, f"bf16 autocast: {name} (SM {cap[0]}{cap[1]}) supports it"
    return torch.float16, True, f"fp16 autocast with a gradient scaler: {name} (SM {cap[0]}{cap[1]}) has no bf16"


class Step:
    """One optimiser step: forward and loss under autocast, backward, gradient clipping, AdamW.

    compile: torch.compile the model's loss (forward and backward become fused Triton kernels).
    graph: also capture the whole step, optimiser included, as one CUDA graph per batch shape and
    replay it. Small models such as GRID's T5 are bound by kernel launches, not arithmetic; a
    replay launches the step's hundreds of kernels at once. The learning rate then lives on the
    GPU as a tensor, so a schedule can change it between replays without a new capture.
    """

    def __init__(self, model, lr, weight_decay, clip, device, betas=(0.9, 0.999), compile=False, graph=False):
        self.model, self.clip, self.device = model, clip, device
        self.dtype, needs_scaler, _ = precision(device)
        self.graph = graph and device.type == "cuda" and not needs_scaler  # a scaler syncs with the CPU
        decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms and biases do not
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
        lr = torch.tensor(lr, device=device) if self.graph else lr
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda", capturable=self.graph)
        self.scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
        self.loss_fn = torch.compile(model.loss) if compile else model.loss
        self.graphs = {}  # batch shapes -> (graph, static batch, static loss)

    def set_lr(self, lr):
        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step(self, batch):
        with torch.autocast(self.device.type, self.dtype or torch.float32, enabled=self.dtype is not None):
            loss, stats = self.loss_fn(batch)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss.detach(), stats

    def __call__(self, batch):
        """Run one step on `batch` (a dict of tensors on the device); returns the loss and the loss's
        parts (tensors on the device: reading them waits for the GPU)."""
        if not self.graph:
            out = self._step(batch)
            self.opt.zero_grad(set_to_none=True)
            return out
        key = tuple((k, tuple(v.shape)) for k, v in batch.items())
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)
        graph, static, (loss, stats) = self.graphs[key]
        for k, v in batch.items():
            static[k].copy_(v)
        graph.replay()
        return loss.clone(), {k: v.clone() for k, v in stats.items()}

    def _capture(self, batch):
        """Warm up on a side stream (compilation, optimiser state, gradient buffers), then capture.
        The warm-up steps are undone (parameters and optimiser state restored in place), so that a
        capture never trains on a batch twice. The copies wait in host memory, off the GPU's peak."""
        params = list(self.model.parameters())
        before = [p.detach().to("cpu", copy=True) for p in params]
        state_before = {p: {k: v.to("cpu", copy=True) for k, v in s.items()} for p, s in self.opt.state.items()}
        static = {k: v.clone() for k, v in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.opt.zero_grad(set_to_none=True)
                self._step(static)
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients at every replay
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None  # one pool for all shapes
        with torch.cuda.graph(graph, pool=pool):
            out = self._step(static)
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
            for p, state in self.opt.state.items():
                for k, t in state.items():
                    t.copy_(state_before[p][k]) if p in state_before else t.zero_()
        return graph, static, out

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)
        if self.graph:  # a captured step reads the learning rate from a tensor on the GPU
            for group in self.opt.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)


def lr_at(step, cfg, total):
    """Linear warm-up, then constant or a cosine decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# Set-up: configuration -> data -> semantic IDs -> model

CONFIGS = {"data": DataConfig, "sid": SIDConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, cls in CONFIGS.items():
        add_arguments(p.add_argument_group(name), cls, skip=("vocab_size",))
    # Model sizes default per preset and architecture (PRESETS): None marks "not given on the command line".
    p.set_defaults(**{f.name: None for f in dataclasses.fields(ModelConfig) if f.name != "arch"})
    args = p.parse_args(argv)
    cfgs = {}
    for name, cls in CONFIGS.items():
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
        if cls is ModelConfig:
            if (args.preset, args.arch) not in PRESETS:
                raise ValueError(f"unknown --preset {args.preset!r} or --arch {args.arch!r}: "
                                 "use --preset paper|tiny and --arch t5|qwen")
            given = {**PRESETS[args.preset, args.arch], **given}
        cfgs[name] = cls(**given)
    return cfgs


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)


@dataclass
class Run:
    """What training and evaluation share: data, semantic IDs, token layout, model."""
    cfgs: dict
    device: torch.device
    dtype: torch.dtype | None
    split: object
    table: SIDTable
    tokens: Tokens
    prefixes: Prefixes
    model: torch.nn.Module

    @property
    def eval_cfg(self):
        return self.cfgs["eval"]


def setup(cfgs, table=None, verbose=True):
    say = print if verbose else (lambda *a: None)
    tc, mc = cfgs["train"], cfgs["model"]
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    dtype, _, why = precision(device)
    say(f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; {why}")
    t0 = time.time()
    ds = load_dataset(cfgs["data"])
    sp = split(ds, cfgs["data"])
    say(describe(ds, sp) + f"\ndata ready in {time.time() - t0:.1f} s")
    table = table or build_sids(ds, cfgs["sid"])
    say(describe_sids(table))
    tokens = Tokens(table.codes, table.sizes, device, sep=tc.sep)
    prefixes = Prefixes(table.codes, table.sizes, device)
    mc.vocab_size = tokens.vocab_size
    model = build_model(mc).to(device)
    n = sum(p.numel() for p in model.parameters())
    attn = ("memory-efficient SDPA with the relative-position bias as a float mask" if mc.arch == "t5"
            else "flash SDPA (causal, right-padded batches need no mask)")
    say(f"model: {mc.arch} ({tc.preset} size), {n / 1e6:.2f}M parameters, {mc.n_layers} layers, d {mc.d_model}, vocab {mc.vocab_size}; "
        f"attention: {attn}")
    if mc.map_steps:
        say(f"MAP: {mc.map_steps} future items, weight {mc.map_weight:g}, {mc.map_kind} {mc.map_head} heads "
            "sharing the embeddings and output projection; training only")
    if mc.keep < 1:
        say(f"SAP: keep {mc.keep:g} of the {'encoder' if mc.arch == 't5' else 'history'} tokens after block "
            f"{mc.prune_layer}, score {mc.sap_score}, {mc.sap_positions} positions"
            f"{', causal-normalised' if mc.sap_causal_norm else ''}; {'also at evaluation' if mc.sap_eval else 'training only'}")
    return Run(cfgs, device, dtype, sp, table, tokens, prefixes, model)


def load_run(folder, device, which="best.pt"):
    """A finished or interrupted run, rebuilt from its folder, for evaluation."""
    ck = torch.load(os.path.join(folder, which), map_location="cpu", weights_only=False)
    cfgs = {name: CONFIGS[name](**ck["configs"][name]) for name in CONFIGS}
    cfgs["train"].device = device.type
    run = setup(cfgs, SIDTable.from_dict(ck["sid_table"]), verbose=False)
    run.model.load_state_dict(ck["model"])
    return run


def model_batch(run, hist, length, target):
    if run.cfgs["model"].arch == "t5":
        return run.tokens.t5(hist, target)
    return run.tokens.qwen(hist, length, target)


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic (a temporary file, then a rename), so a crash never leaves a broken one


def save(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint(run, step, state):
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []}
    return {"model": run.model.state_dict(), "optimizer": step.state_dict(), "state": dict(state), "rng": rng,
            "configs": {k: dataclasses.asdict(v) for k, v in run.cfgs.items()}, "sid_table": run.table.to_dict()}


def peak_mib(device):
    """Peak memory since the last call. A CUDA graph allocates its pool when it is captured; its
    replays allocate nothing, so after the first phase the pool shows under reserved."""
    if device.type != "cuda":
        return {}
    out = {"peak_alloc_mib": torch.cuda.max_memory_allocated() / 2**20, "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    torch.cuda.reset_peak_memory_stats()
    return out


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfgs):
    tc, dc = cfgs["train"], cfgs["data"]
    mc = cfgs["model"]
    name = (f"{os.path.basename(dc.data.rstrip('/'))}-{mc.arch}" + (f"-keep{mc.keep:g}" if mc.keep < 1 else "")
            + (f"-map{mc.map_steps}" if mc.map_steps else ""))
    out = tc.out or os.path.join("out", f"{name}-seed{tc.seed}")
    if os.path.exists(os.path.join(out, "config.json")) and not (tc.resume or tc.overwrite):
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                         "or --out to choose another folder")
    run = setup(cfgs)
    dev, sp, model = run.device, run.split, run.model
    os.makedirs(out, exist_ok=True)
    json.dump({k: dataclasses.asdict(v) for k, v in cfgs.items()}, open(os.path.join(out, "config.json"), "w"), indent=1)
    cuda = dev.type == "cuda"
    step = Step(model, tc.lr, tc.weight_decay, tc.clip, dev, compile=tc.compile and cuda, graph=tc.graph and cuda)
    print(f"training step: {'compiled' if tc.compile and cuda else 'eager'}"
          f"{', one CUDA graph per length bucket' if step.graph else ''}; AdamW{' (fused)' if cuda else ''}")
    hist, length, target = (torch.as_tensor(a, device=dev) for a in (sp.train_hist, sp.train_len, sp.train_target))
    steps_ahead = cfgs["model"].map_steps
    future = torch.as_tensor(future_items(sp, steps_ahead), device=dev) if steps_ahead else None
    buckets = length_buckets(sp.train_len, sp.train_hist.shape[1], tc.buckets)
    per_epoch = len(batches(sp.train_len, buckets, tc.batch_size, torch.Generator()))
    total = tc.max_steps or tc.epochs * per_epoch
    eval_every = tc.eval_every or per_epoch
    print(f"schedule: {per_epoch} steps per epoch, {total} steps, history buckets {buckets}, "
          f"validation every {eval_every} steps, patience {tc.patience}")
    state = {"step": 0, "epoch": 0, "batch": 0, "best": -1.0, "bad": 0, "train_s": 0.0, "samples": 0, "tokens": 0}
    if tc.resume:
        ck = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        step.load_state_dict(ck["optimizer"])
        state = ck["state"]
        torch.set_rng_state(ck["rng"]["cpu"])
        if cuda and ck["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        print(f"resumed {out} at step {state['step']} (epoch {state['epoch']}, best NDCG@10 {state['best']:.4f})")
    if tc.mem_snapshot and cuda:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    log = open(os.path.join(out, "log.jsonl"), "a")
    bar = tqdm(total=total, initial=state["step"], desc="train", dynamic_ncols=True, disable=None)
    sums, loss_n, t0 = {}, 0, time.perf_counter()  # running sums of the loss and its parts, on the device
    model.train()
    while state["step"] < total and state["bad"] < tc.patience:
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + state["epoch"])
        epoch = batches(sp.train_len, buckets, tc.batch_size, g)
        for idx, h in epoch[state["batch"]:]:
            idx = idx.to(dev)
            batch = model_batch(run, hist[idx, :h], length[idx], target[idx])
            if future is not None:
                batch.update(targets(run.tokens, future[idx]))
            step.set_lr(lr_at(state["step"], tc, total))
            loss, parts = step(batch)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0) + v
            loss_n += 1
            state["step"] += 1
            state["batch"] += 1
            state["samples"] += len(idx)
            state["tokens"] += sum(v.numel() for k, v in batch.items() if k in ("enc", "dec", "ids"))
            if state["step"] == 5 and tc.mem_snapshot and cuda:
                torch.cuda.memory._dump_snapshot(tc.mem_snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)
                print(f"memory snapshot of steps 1-5 written to {tc.mem_snapshot} (open it at pytorch.org/memory_viz)")
            if state["step"] % tc.log_every == 0:
                bar.set_postfix(loss=f"{sums['loss'].item() / loss_n:.4f}", lr=f"{lr_at(state['step'], tc, total):.2e}")
                bar.update(tc.log_every)
            if state["step"] % eval_every == 0 or state["step"] == total:
                if cuda:
                    torch.cuda.synchronize()
                state["train_s"] += time.perf_counter() - t0
                mem = peak_mib(dev)
                m = evaluate(model, run.tokens, run.prefixes, sp.valid_hist, sp.valid_len, sp.valid_target,
                             run.eval_cfg, run.dtype)
                model.train()
                better = m["ndcg@10"] > state["best"]
                state["best"], state["bad"] = (m["ndcg@10"], 0) if better else (state["best"], state["bad"] + 1)
                rec = {"step": state["step"], "epoch": state["epoch"],
                       **{k: v.item() / max(loss_n, 1) for k, v in sums.items()}, "valid": m, "samples_s": state["samples"] / state["train_s"],
                       "tokens_s": state["tokens"] / state["train_s"], "train_mem": mem, "eval_mem": peak_mib(dev)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.write(f"step {state['step']}: loss {rec['loss']:.4f} | valid " + " ".join(
                    f"{k} {v:.4f}" for k, v in m.items()) + (" *" if better else ""))
                ck = checkpoint(run, step, state)
                save(os.path.join(out, "last.pt"), ck)
                if better:
                    save(os.path.join(out, "best.pt"), ck)
                sums, loss_n, t0 = {}, 0, time.perf_counter()
            if state["step"] >= total or state["bad"] >= tc.patience:
                break
        else:
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
    bar.close()
    return finish(run, out, state)


def finish(run, out, state):
    """Test the best checkpoint once; write results.json; print the one-line summary."""
    run.model.load_state_dict(torch.load(os.path.join(out, "best.pt"), map_location="cpu", weights_only=False)["model"])
    sp = run.split
    t0 = time.perf_counter()
    test = evaluate(run.model, run.tokens, run.prefixes, sp.test_hist, sp.test_len, sp.test_target, run.eval_cfg, run.dtype)
    eval_s = time.perf_counter() - t0
    mem = max((json.loads(line)["train_mem"].get("peak_alloc_mib", 0) for line in open(os.path.join(out, "log.jsonl"))),
              default=0)
    res = {**test, "best_valid_ndcg@10": state["best"], "steps": state["step"], "train_s": state["train_s"],
           "samples_s": state["samples"] / max(state["train_s"], 1e-9), "tokens_s": state["tokens"] / max(state["train_s"], 1e-9),
           "test_eval_s": eval_s, "peak_train_mib": mem,
           "popularity": popularity(sp.train_seqs, sp.test_target, run.table.n_items),
           "device": torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu", "torch": torch.__version__}
    json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
    print(f"done: {state['step']} steps in {state['train_s']:.0f} s, {res['samples_s']:,.0f} samples/s, "
          f"{res['tokens_s']:,.0f} tokens/s, peak {mem:,.0f} MiB | test " + " ".join(
              f"{k} {v:.4f}" for k, v in test.items()) + f" (popularity ndcg@10 {res['popularity']['ndcg@10']:.4f})"
          f" | {out}")
    return res


def main(argv=None):
    try:
        train(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
