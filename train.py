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

import dist
import sap
from data import DataConfig, Tokens, add_arguments, batches, describe, length_buckets, load_dataset, split
from evaluate import EvalConfig, Prefixes, evaluate, popularity
from map import future_items, targets
from model import ModelConfig, build_model
from sid import SIDConfig, SIDTable, build_sids
from sid import describe as describe_sids
from step import Step, precision

PRESETS = {  # a recipe per size and architecture: model sizes and training settings; flags given win
    # GRID's T5 (ModelConfig's defaults: 4 + 4 blocks, d 128, 6 heads of 64, d_ff 1024, dropout 0.15) with
    # GRID's optimiser settings: Adam at a constant 1e-3 on batches of thousands of samples (32 users x
    # all their prefixes x 16 accumulated micro-batches) for ~100 epochs. At batch 256 and 10-20 epochs
    # the same model reaches half its accuracy (README, "Results"). GRID resets its layers to PyTorch's
    # defaults: over three seeds that init beat Hugging Face's T5 init by 2 to 6% on every test metric.
    ("paper", "t5"): dict(batch_size=2048, schedule="constant", warmup_steps=200, epochs=150, init="torch"),
    # decoder-only at about the T5's parameter count: 8 blocks, d 128, 6 query and 2 kv heads
    ("paper", "qwen"): dict(n_layers=8, n_kv_heads=2, dropout=0.1, rope_theta=10000.0),
    # a CPU smoke-test size: trains on synthetic data in a few minutes on two cores
    ("tiny", "t5"): dict(d_model=64, n_layers=2, n_decoder_layers=2, n_heads=4, head_dim=16, d_ff=256, dropout=0.0),
    ("tiny", "qwen"): dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=256, dropout=0.0,
                           rope_theta=10000.0),
}


@dataclass
class TrainConfig:
    batch_size: int = field(default=256, metadata={"help": "samples per micro-batch on each GPU (an optimiser step "
                                                   "takes batch-size x accum x GPUs; the paper t5 recipe: 2048)"})
    accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step (gradient accumulation)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (GRID: 1e-3)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (decay apart from the gradient) or adam "
                                                      "(decay added to the gradient as L2, as GRID's Adam)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay on matrices (GRID: adam, 1e-4)"})
    warmup_steps: int = field(default=500, metadata={"help": "linear learning-rate warm-up"})
    schedule: str = field(default="cosine", metadata={"help": "after warm-up: cosine (to 0 at the last epoch) or "
                                                 "constant (the paper t5 recipe, as GRID)"})
    epochs: int = field(default=30, metadata={"help": "passes over the training samples (the paper t5 recipe: 150)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimiser steps (0: epochs decide)"})
    clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0: none, as GRID)"})
    eval_every: int = field(default=0, metadata={"help": "validate every N steps (0: once per epoch, at most ~20 times a run)"})
    save_every: int = field(default=0, metadata={"help": "also write last.pt every N steps (0: only at validations)"})
    patience: int = field(default=10, metadata={"help": "stop after this many validations without a better NDCG@10"})
    buckets: int = field(default=4, metadata={"help": "history-length buckets (static shapes for compile/graphs)"})
    sep: bool = field(default=True, metadata={"help": "t5: a separator token after each history item (GRID)"})
    preset: str = field(default="paper", metadata={"help": "model size: paper (GRID's T5 / a Qwen of its size) or "
                                                    "tiny (CPU smoke tests); size flags override it"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    amp: bool = field(default=True, metadata={"help": "CUDA: bf16 (or fp16) autocast; --no-amp trains in fp32"})
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
        positive = ("batch_size", "accum", "epochs", "patience", "log_every")
        for name in positive + ("warmup_steps", "max_steps", "eval_every", "save_every"):
            least = 1 if name in positive else 0
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is below {least}: use {least} or more")
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"unknown --optimizer '{self.optimizer}': use adamw or adam")
        if self.clip < 0 or self.weight_decay < 0:
            raise ValueError(f"--clip {self.clip} or --weight-decay {self.weight_decay} is negative: use 0 (off) or more")
        if self.lr <= 0:
            raise ValueError(f"--lr {self.lr} is not positive: use a learning rate such as 1e-3")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pass one of them")


def lr_at(step, cfg, total):
    """Linear warm-up, then constant or a cosine decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def default_eval_every(per_epoch, total):
    """Once per epoch, but at most about 20 validations a run: each is a beam search over every user
    (Beauty: ~5 s on an H100, as long as one to two epochs of T5 training at batch 2048)."""
    return per_epoch * math.ceil(total / per_epoch / 20)


# ---------------------------------------------------------------------------------------------
# Set-up: configuration -> data -> semantic IDs -> model

CONFIGS = {"data": DataConfig, "sid": SIDConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, cls in CONFIGS.items():
        add_arguments(p.add_argument_group(name), cls, skip=("vocab_size", "code_sizes", "sap_len"))
    # Model sizes and the fields of a recipe default per preset and architecture (PRESETS): None marks
    # "not given on the command line".
    unset = {f.name for f in dataclasses.fields(ModelConfig) if f.name != "arch"} | {k for r in PRESETS.values() for k in r}
    p.set_defaults(**dict.fromkeys(unset))
    args = p.parse_args(argv)
    for flag, value, known in (("arch", args.arch, list(dict.fromkeys(a for _, a in PRESETS))),
                               ("preset", args.preset, list(dict.fromkeys(p for p, _ in PRESETS)))):
        if value not in known:
            raise ValueError(f"unknown --{flag} {value!r}: use {' or '.join(known)}")
    recipe = PRESETS[args.preset, args.arch]
    cfgs = {}
    for name, cls in CONFIGS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
        cfgs[name] = cls(**{**{k: v for k, v in recipe.items() if k in names}, **given})
    if cfgs["model"].level_softmax and cfgs["eval"].beam_norm == "vocab":
        raise ValueError("--level-softmax leaves scores across levels untrained: add --beam-norm level or valid")
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
    dtype, _, why = precision(device, tc.amp)
    say(f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; {why}")
    t0 = time.time()
    ds = load_dataset(cfgs["data"])
    sp = split(ds, cfgs["data"])
    say(describe(ds, sp) + f"\ndata ready in {time.time() - t0:.1f} s")
    table = table or build_sids(ds, cfgs["sid"])
    say(describe_sids(table))
    tokens = Tokens(table.codes, table.sizes, device, sep=tc.sep)
    prefixes = Prefixes(table.codes, table.sizes, device)
    mc.vocab_size, mc.code_sizes = tokens.vocab_size, list(tokens.sizes)
    mc.sap_len = tokens.history_len(mc.arch, sp.train_hist.shape[1])  # the longest history: SAP's candidates
    model = build_model(mc).to(device)
    n = sum(p.numel() for p in model.parameters())
    attn = ("memory-efficient SDPA with the relative-position bias as a float mask" if mc.arch == "t5"
            else "flash SDPA (causal, right-padded batches need no mask)")
    say(f"model: {mc.arch} ({tc.preset} size), {n / 1e6:.2f}M parameters, {mc.n_layers} layers, d {mc.d_model}, vocab {mc.vocab_size}, "
        f"init {mc.init}; attention: {attn}")
    if mc.map_steps:
        say(f"MAP: {mc.map_steps} future items, weight {mc.map_weight:g}, {mc.map_kind} {mc.map_head} heads "
            "sharing the embeddings and output projection; training only")
    if mc.keep < 1:
        say(f"SAP: after block {mc.prune_layer}, keep at most {sap.n_kept(mc, mc.sap_len, 0)} of the "
            f"{'encoder' if mc.arch == 't5' else 'history'} tokens ({mc.keep:g} of the longest history's "
            f"{mc.sap_len}), score {mc.sap_score}, {mc.sap_positions} positions"
            f"{', causal-normalised' if mc.sap_causal_norm else ''}; {'also at evaluation' if mc.sap_eval else 'training only'}")
    return Run(cfgs, device, dtype, sp, table, tokens, prefixes, model)


def load_run(folder, device, which="best.pt", data_dir=None):
    """A finished or interrupted run, rebuilt from its folder, for evaluation (its data read from
    data_dir if given: a run trained on another machine)."""
    ck = torch.load(os.path.join(folder, which), map_location="cpu", weights_only=False)
    cfgs = {name: CONFIGS[name](**ck["configs"][name]) for name in CONFIGS}
    cfgs["train"].device = device.type
    cfgs["data"].data_dir = data_dir or cfgs["data"].data_dir
    run = setup(cfgs, SIDTable.from_dict(ck["sid_table"]), verbose=False)
    run.model.load_state_dict(ck["model"])
    return run


def model_batch(run, hist, length, target):
    if run.cfgs["model"].arch == "t5":
        return run.tokens.t5(hist, target)
    return run.tokens.qwen(hist, length, target)


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic (a temporary file, then a rename), so a crash never leaves a broken one


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, out of memory); main() prints it as one line."""


def save(path, obj):
    """Write a temporary file, flush it to the disk, then rename it over `path`: a process killed at
    any moment, even mid-write, leaves the previous file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint(run, step, state, sums, loss_n):
    """All a resumed run needs to go on exactly as if never stopped: weights, optimiser, RNG, its place in
    the data (epoch, batch), the loss sums since the last validation, configs and SID table."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []}
    state = {**state, "sums": {k: float(v) for k, v in sums.items()}, "loss_n": loss_n}
    return {"model": run.model.state_dict(), "optimizer": step.state_dict(), "state": state, "rng": rng,
            "configs": {k: dataclasses.asdict(v) for k, v in run.cfgs.items()}, "sid_table": run.table.to_dict()}


# On --resume these must be as in the checkpoint: they decide the data, the model's shape and its inputs.
# Not data_dir (the same data may live elsewhere), nor vocab_size and code_sizes (the SID table's fingerprint decides
# them), nor sap_len (max_items does).
MUST_MATCH = [("train", "preset"), ("train", "sep")] + [
    (group, f.name) for group, cls in (("data", DataConfig), ("model", ModelConfig))
    for f in dataclasses.fields(cls) if f.name not in ("data_dir", "vocab_size", "code_sizes", "sap_len")]


def check_resumable(ck, cfgs, path):
    for group, name in MUST_MATCH:
        here = getattr(cfgs[group], name)
        if (there := ck["configs"][group].get(name, here)) != here:
            raise ValueError(f"--resume: --{name.replace('_', '-')} is {here!r} here but {there!r} in {path}; "
                             "resume with the run's settings (its config.json) or start a new run with --out")


def mean_loss(sums, n, step, last, saved):
    """The mean training loss since the last validation. Reading it waits for the GPU, so the loop checks
    it only where it reads values anyway (the progress bar every --log-every steps, checkpoints): a
    non-finite loss stops the run within --log-every steps and never reaches a checkpoint."""
    loss = sums["loss"].item() / n
    if not math.isfinite(loss):
        good = f"{last} (step {saved}) is the last good checkpoint" if saved else "no checkpoint was written yet"
        raise TrainingError(f"the training loss is {loss} at step {step}; {good}: lower --lr, raise --warmup-steps "
                            "or train in fp32 (--no-amp), and --resume")
    return loss


def out_of_memory(step_n, batch):
    tokens = batch["enc"] if "enc" in batch else batch["ids"]  # (B, T)
    return (f"CUDA out of memory at step {step_n}: batch {tokens.shape[0]} x {tokens.shape[1]} tokens, peak "
            f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB allocated; lower --batch-size, --max-items "
            "(shorter histories) or --keep (SAP drops tokens)")


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
    tc, dc, mc = cfgs["train"], cfgs["data"], cfgs["model"]
    name = (f"{os.path.basename(dc.data.rstrip('/'))}-{mc.arch}" + (f"-keep{mc.keep:g}" if mc.keep < 1 else "")
            + (f"-map{mc.map_steps}" if mc.map_steps else ""))
    out = tc.out or os.path.join("out", f"{name}-seed{tc.seed}")
    last, held = os.path.join(out, "last.pt"), os.path.exists(os.path.join(out, "config.json"))
    if held and not (tc.resume or tc.overwrite):
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                         "or --out to choose another folder")
    if tc.resume and not held:
        raise ValueError(f"--resume: {out} holds no run to continue; drop --resume to start one, or fix --out")
    # A run killed before its first checkpoint has a config.json but no last.pt: it starts again at step 0.
    ck = torch.load(last, map_location="cpu", weights_only=False) if tc.resume and os.path.exists(last) else None
    if ck:
        check_resumable(ck, cfgs, last)
    rank, world = dist.init()
    lead = rank == 0  # only rank 0 prints and writes
    say = dist.say
    run = setup(cfgs, verbose=lead)
    if world > 1:  # the same initial weights everywhere (DDP broadcasts rank 0's anyway), but each rank its own dropout
        torch.manual_seed(tc.seed * 1000 + rank)
    if ck and ck["sid_table"]["fingerprint"] != run.table.fingerprint():
        raise ValueError(f"--resume: the SID table built now ({run.table.fingerprint()}) is not the one in {last} "
                         f"({ck['sid_table']['fingerprint']}); give the run's SID flags (its config.json) or start a "
                         "new run with --out")
    dev, sp, model = run.device, run.split, run.model
    cuda = dev.type == "cuda"
    step = Step(model, tc.lr, tc.weight_decay, tc.clip, dev, compile=tc.compile and cuda, graph=tc.graph and cuda,
                amp=tc.amp, accum=tc.accum, optimizer=tc.optimizer)
    say(f"training step: {'compiled' if tc.compile and cuda else 'eager'}"
        f"{', one CUDA graph per length bucket' if step.graph else ''}; {type(step.opt).__name__}{' (fused)' if cuda else ''}"
        f", weight decay {tc.weight_decay:g}, {f'clipping at {tc.clip:g}' if tc.clip else 'no clipping'}"
        f"{f'; DDP over {world} processes' if world > 1 else ''}"
        f"{f'; {tc.accum} micro-batches per step' if tc.accum > 1 else ''}")
    hist, length, target = (torch.as_tensor(a, device=dev) for a in (sp.train_hist, sp.train_len, sp.train_target))
    steps_ahead = cfgs["model"].map_steps
    future = torch.as_tensor(future_items(sp, steps_ahead), device=dev) if steps_ahead else None
    buckets = length_buckets(sp.train_len, sp.train_hist.shape[1], tc.buckets)
    chunk = world * tc.accum  # batches of the epoch's list per optimiser step, all ranks together
    per_epoch = len(batches(sp.train_len, buckets, tc.batch_size, torch.Generator())) // chunk
    if per_epoch == 0:
        raise ValueError(f"the {len(sp.train_len):,} training samples do not fill one step of {chunk} batch(es) of "
                         f"--batch-size {tc.batch_size} in the length buckets: lower --batch-size, --accum or --buckets")
    total = tc.max_steps or tc.epochs * per_epoch
    eval_every = tc.eval_every or default_eval_every(per_epoch, total)
    say(f"schedule: batch {tc.batch_size * chunk}, lr {tc.lr:g} {tc.schedule} after {tc.warmup_steps} warm-up steps, "
        f"{per_epoch} steps per epoch, {total} steps, history buckets {buckets}, "
        f"validation every {eval_every} steps{f', checkpoint every {tc.save_every}' if tc.save_every else ''}, "
        f"patience {tc.patience}")
    if lead:
        os.makedirs(out, exist_ok=True)
        for f in ("last.pt", "best.pt", "results.json") if tc.overwrite else ():  # never resume or test the old run
            if os.path.exists(path := os.path.join(out, f)):
                os.remove(path)
        json.dump({k: dataclasses.asdict(v) for k, v in cfgs.items()}, open(os.path.join(out, "config.json"), "w"), indent=1)
    state = {"step": 0, "epoch": 0, "batch": 0, "best": -1.0, "bad": 0, "train_s": 0.0, "samples": 0, "tokens": 0,
             "low": math.inf}  # low: the lowest mean training loss of a validation so far
    sums, loss_n, saved = {}, 0, None  # running sums of the loss and its parts (on the device); last.pt's step
    if ck:
        model.load_state_dict(ck["model"])
        step.load_state_dict(ck["optimizer"])
        state = ck["state"]
        sums, loss_n, saved = state.pop("sums", {}), state.pop("loss_n", 0), state["step"]
        if world == 1:  # several ranks keep their own dropout streams
            torch.set_rng_state(ck["rng"]["cpu"])
            if cuda and ck["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        say(f"resumed {out} at step {state['step']} (epoch {state['epoch']}, best NDCG@10 {state['best']:.4f})")
    elif tc.resume:
        say(f"resumed {out}: it has no checkpoint yet, so it starts again at step 0")
    if tc.mem_snapshot and cuda:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    # A resumed run redoes what came after its checkpoint: drop those log lines (and a half-written last one).
    log_path = os.path.join(out, "log.jsonl")
    kept = open(log_path).readlines() if ck and os.path.exists(log_path) else []
    log = open(log_path, "w") if lead else open(os.devnull, "w")
    log.writelines(line for line in kept if line.endswith("\n") and json.loads(line)["step"] <= state["step"])
    bar = tqdm(total=total, initial=state["step"], desc="train", dynamic_ncols=True, disable=None if lead else True)
    t0 = time.perf_counter()
    model.train()
    while state["step"] < total and state["bad"] < tc.patience:
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + state["epoch"])
        epoch = batches(sp.train_len, buckets, tc.batch_size, g)
        for start in range(state["batch"], len(epoch) - chunk + 1, chunk):
            micro = []
            for idx, h in dist.my_batches(epoch, start, tc.accum):
                idx = idx.to(dev)
                micro.append(model_batch(run, hist[idx, :h], length[idx], target[idx]))
                if future is not None:
                    micro[-1].update(targets(run.tokens, future[idx]))
            step.set_lr(lr_at(state["step"], tc, total))
            try:
                loss, parts = step(micro)
            except torch.cuda.OutOfMemoryError:
                raise TrainingError(out_of_memory(state["step"] + 1, micro[0])) from None
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0) + v
            loss_n += 1
            state["step"] += 1
            state["batch"] = start + chunk  # a place in the epoch's list: the same on any number of ranks
            state["samples"] += tc.batch_size * chunk
            # tokens of this rank's micro-batches, times the ranks (theirs are about as long)
            state["tokens"] += world * sum(v.numel() for b in micro for k, v in b.items() if k in ("enc", "dec", "ids"))
            if state["step"] == 5 and tc.mem_snapshot and cuda:
                torch.cuda.memory._dump_snapshot(tc.mem_snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)
                say(f"memory snapshot of steps 1-5 written to {tc.mem_snapshot} (open it at pytorch.org/memory_viz)")
            at_eval = state["step"] % eval_every == 0 or state["step"] == total
            at_save = at_eval or (tc.save_every and state["step"] % tc.save_every == 0)
            if state["step"] % tc.log_every == 0 or at_save:
                loss_now = mean_loss(sums, loss_n, state["step"], last, saved)
            if state["step"] % tc.log_every == 0:
                bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr_at(state['step'], tc, total):.2e}")
                bar.update(tc.log_every)
            if at_save:
                if cuda:
                    torch.cuda.synchronize()
                state["train_s"] += time.perf_counter() - t0
                better = False
                if at_eval:
                    mem = peak_mib(dev)
                    try:
                        m = evaluate(model, run.tokens, run.prefixes, sp.valid_hist, sp.valid_len, sp.valid_target,
                                     run.eval_cfg, run.dtype)
                    except torch.cuda.OutOfMemoryError:
                        raise TrainingError(f"CUDA out of memory while validating at step {state['step']} (--eval-batch "
                                            f"{run.eval_cfg.eval_batch} users at once); lower --eval-batch and "
                                            "--resume") from None
                    model.train()
                    better = m["ndcg@10"] > state["best"]
                    state["best"], state["bad"] = (m["ndcg@10"], 0) if better else (state["best"], state["bad"] + 1)
                    rec = {"step": state["step"], "epoch": state["epoch"], **{k: float(v) / loss_n for k, v in sums.items()},
                           "valid": m, "samples_s": state["samples"] / state["train_s"],
                           "tokens_s": state["tokens"] / state["train_s"], "train_mem": mem, "eval_mem": peak_mib(dev)}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if lead:
                        bar.write(f"step {state['step']}: loss {rec['loss']:.4f} | valid " + " ".join(
                            f"{k} {v:.4f}" for k, v in m.items()) + (" *" if better else ""))
                    low = state.get("low", math.inf)  # checkpoints of older runs lack it
                    if rec["loss"] > 2 * low and lead:  # a finite loss can still blow up (constant lr 1e-3 did)
                        bar.write(f"warning: the training loss {rec['loss']:.4f} is over twice its lowest ({low:.4f}): the "
                                  f"run has likely diverged; best.pt keeps its best validation (NDCG@10 {state['best']:.4f}). "
                                  "Lower --lr or raise --warmup-steps and train again with --overwrite")
                    state["low"] = min(low, rec["loss"])
                    sums, loss_n = {}, 0
                if lead:
                    ck = checkpoint(run, step, state, sums, loss_n)
                    if better:  # best.pt first: a run killed between the two redoes this validation when resumed
                        save(os.path.join(out, "best.pt"), ck)
                    save(last, ck)
                saved, t0 = state["step"], time.perf_counter()
            if state["step"] >= total or state["bad"] >= tc.patience:
                break
        else:
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
    bar.close()
    return finish(run, out, state)


def finish(run, out, state):
    """Test the best checkpoint once; write results.json; print the one-line summary."""
    dist.barrier()  # rank 0 has written best.pt
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
    if dist.rank_world()[0] > 0:
        return res
    json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
    print(f"done: {state['step']} steps in {state['train_s']:.0f} s, {res['samples_s']:,.0f} samples/s, "
          f"{res['tokens_s']:,.0f} tokens/s, peak {mem:,.0f} MiB | test " + " ".join(
              f"{k} {v:.4f}" for k, v in test.items()) + f" (popularity ndcg@10 {res['popularity']['ndcg@10']:.4f})"
          f" | {out}")
    return res


def main(argv=None):
    done = False
    try:
        train(parse_args(argv))
        done = True
    except (ValueError, FileNotFoundError, TrainingError) as e:
        sys.exit(f"error: {e}")
    finally:
        dist.close(together=done)


if __name__ == "__main__":
    main()
