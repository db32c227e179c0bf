"""Time one training step (forward, loss, backward, gradient clipping, AdamW) on the GPU.

    python bench.py --arch t5                 # GRID's T5: batch 256 x 150 encoder tokens, 4 decoder tokens
    python bench.py --arch qwen --batch 16    # Qwen2.5-0.5B's shape, 513 tokens
    python bench.py --arch both --modes eager,compile,graph --out results.json
    python bench.py --arch qwen --modes graph --batch 64 --keep 1,0.5,0.33,0.25   # SAP's speed-up
    python bench.py --arch t5 --modes graph --real beauty --keep 1,0.33           # on Beauty's real histories
    python bench.py --arch t5 --modes graph --map-steps 0,2                       # MAP's overhead
    torchrun --nproc_per_node 2 bench.py --arch qwen --modes compile              # DDP (no graphs under DDP)

Each mode is timed with CUDA events, the median of --steps steps after --warmup steps, on the same
random batch (token values do not change the work). Modes: `eager`; `compile` (torch.compile of the
loss); `graph` (compiled, then the whole step captured as one CUDA graph and replayed: no launch
overhead at all, see step.Step). TFLOP/s counts 6 * params * tokens for the matrices plus the full
(not halved causal) attention matrices, as the reference numbers in METHOD.md do.
"""
import argparse
import json
import math
import statistics
import sys
import time

import dataclasses
import itertools

import torch

import dist
from data import DataConfig, Tokens, batches, length_buckets, load_dataset, split
from map import future_items, targets
from model import ModelConfig, build_model
from sid import SIDConfig, build_sids
from step import Step, precision

SHAPES = {  # the two shapes of the issue: GRID's T5 and Qwen2.5-0.5B (vocab cut to 2,048)
    "t5": dict(batch=256, seq=150, cfg=ModelConfig(arch="t5", vocab_size=1030, d_model=128, n_layers=4,
                                                   n_decoder_layers=4, n_heads=6, head_dim=64, d_ff=1024, dropout=0.15)),
    "qwen": dict(batch=16, seq=513, cfg=ModelConfig(arch="qwen", vocab_size=2048, d_model=896, n_layers=24, n_heads=14,
                                                    n_kv_heads=2, head_dim=64, d_ff=4864, dropout=0.0, rope_theta=1e6)),
}
CODES = 4  # tokens per semantic ID: 3 levels + disambiguation


def random_batch(arch, B, S, V, device, seed=0, map_steps=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tok = lambda *shape: torch.randint(3, V, shape, generator=g).to(device)
    aux = {"map_dec": tok(B, map_steps, CODES), "map_labels": tok(B, map_steps, CODES)} if map_steps else {}
    if arch == "t5":
        return {"enc": tok(B, S), "enc_mask": torch.ones(B, S, dtype=torch.bool, device=device),
                "dec": tok(B, CODES), "labels": tok(B, CODES), **aux}
    # Qwen: history, separator, target; the last CODES + 1 states predict the target codes.
    pred = torch.arange(S - CODES - 1, S - 1, device=device).expand(B, CODES)
    prior = torch.zeros(B, S, device=device)
    prior[:, S - CODES - 1:] = math.inf  # SAP: separator and target always stay
    return {"ids": tok(B, S), "pred_pos": pred.contiguous(), "labels": tok(B, CODES), "prior": prior, **aux}


def qwen_flops(cfg, B, S):
    """Matrix FLOPs of a decoder-only step: 6 per parameter per token (forward 2, backward 4) plus the
    attention matrices (QK^T and AV), counted in full as the reference numbers do."""
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    n -= 0 if cfg.tie_embeddings else model.embed.weight.numel()  # a lookup, not a matrix product
    return 6 * n * B * S + 3 * 4 * B * S * S * cfg.n_heads * cfg.head_dim * cfg.n_layers


def real_batches(data, data_dir, n, B, padded, device, map_steps=0):
    """n training batches of T5 inputs from a real dataset: padded to max_items (GRID) or cut to our
    length buckets, with MAP's targets if map_steps. -> list of batches, vocabulary size, the longest
    history's tokens (what SAP's keep is a fraction of, as in train.py)."""
    dc = DataConfig(data=data, data_dir=data_dir)
    ds = load_dataset(dc)
    sp = split(ds, dc)
    table = build_sids(ds, SIDConfig())
    tokens = Tokens(table.codes, table.sizes, device)
    buckets = [dc.max_items] if padded else length_buckets(sp.train_len, dc.max_items, 4)
    hist, target = torch.as_tensor(sp.train_hist, device=device), torch.as_tensor(sp.train_target, device=device)
    epoch = batches(sp.train_len, buckets, B, torch.Generator().manual_seed(0))[:n]
    future = torch.as_tensor(future_items(sp, map_steps), device=device) if map_steps else None
    out = []
    for idx, h in epoch:
        idx = idx.to(device)
        out.append({**tokens.t5(hist[idx, :h], target[idx]), **(targets(tokens, future[idx]) if map_steps else {})})
    return out, tokens.vocab_size, tokens.history_len("t5", dc.max_items)


def time_mode(arch, mode, keep, data, steps, warmup, device, label="", map_steps=0):
    """Median (random batch) or mean (real batches, several shapes) step time of one configuration."""
    first = data[0][0]
    world = dist.rank_world()[1]  # under torchrun every rank steps its own batch: throughput counts them all
    B, S = first[next(iter(first))].shape
    cfg = dataclasses.replace(SHAPES[arch]["cfg"], keep=keep, vocab_size=data[1], sap_len=data[2], map_steps=map_steps)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    step = Step(model, lr=1e-3, weight_decay=0.0, clip=1.0, device=device, compile=mode != "eager",
                graph=mode == "graph")
    batches_ = data[0]
    # Peak memory from the first step on: a CUDA graph allocates everything while it is captured.
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup + len(batches_)):  # every shape compiled and captured before timing
        step(batches_[i % len(batches_)])
    torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    times, tokens = [], 0
    for i in range(max(steps, len(batches_))):
        b = batches_[i % len(batches_)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss, _ = step(b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        tokens += b[next(iter(b))].numel()
    ms = statistics.median(times) if len(batches_) == 1 else statistics.mean(times)
    row = dict(arch=arch, mode=mode, keep=keep, map_steps=map_steps, data=label or "random", batch=B, seq=S, ms=ms, ms_min=min(times),
               ms_max=max(times), samples_s=B * world / ms * 1e3, tokens_s=tokens * world / sum(times) * 1e3,
               tflops=qwen_flops(cfg, B, S) / ms / 1e9 if arch == "qwen" and keep == 1 else None,
               peak_mib=torch.cuda.max_memory_allocated() / 2**20, setup_s=setup, loss=float(loss))
    del step, model
    torch.cuda.empty_cache()
    return row


def profile(arch, mode, B, S, device, keep=1.0, top=25):
    """Where the time goes: the kernels of a few steps, by total CUDA time."""
    cfg = dataclasses.replace(SHAPES[arch]["cfg"], keep=keep)
    model = build_model(cfg).to(device).train()
    step = Step(model, lr=1e-3, weight_decay=0.0, clip=1.0, device=device, compile=mode != "eager", graph=False)
    batch = random_batch(arch, B, S, cfg.vocab_size, device)
    for _ in range(5):
        step(batch)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(batch)
        torch.cuda.synchronize()
    print(f"{arch} {mode} keep {keep}: the kernels of 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="both", choices=["t5", "qwen", "both"], help="which shape to time")
    p.add_argument("--batch", type=int, default=0, help="batch size; 0 = the shape's default (t5 256, qwen 16)")
    p.add_argument("--seq", type=int, default=0, help="sequence length; 0 = the shape's default (t5 150, qwen 513)")
    p.add_argument("--modes", default="eager,compile,graph", help="comma-separated: eager, compile, graph")
    p.add_argument("--steps", type=int, default=30, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, graph capture)")
    p.add_argument("--keep", default="1", help="SAP retention ratios to time, comma-separated (1 = no pruning)")
    p.add_argument("--map-steps", default="0", help="MAP depths to time, comma-separated (0 = off)")
    p.add_argument("--real", default="", help="t5: time real training batches of this dataset instead of random ones")
    p.add_argument("--layout", default="padded,buckets", help="--real batches: padded to 30 items (GRID) and/or "
                                                              "cut to train.py's length buckets")
    p.add_argument("--data-dir", default=DataConfig().data_dir, help="where --real looks for the dataset")
    p.add_argument("--profile", default="", help="print a kernel profile of this mode (eager or compile) at each "
                                                 "--keep afterwards")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.py times GPU steps: no CUDA device is visible")
    rank, world = dist.init()
    device = torch.device("cuda")
    say = dist.say
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py does
    say(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {precision(device)[2]}"
        f"{f' | DDP over {world} GPUs, samples/s of all of them' if world > 1 else ''}")
    rows = []
    keeps, depths = [float(k) for k in args.keep.split(",")], [int(d) for d in args.map_steps.split(",")]
    for arch in (["t5", "qwen"] if args.arch == "both" else [args.arch]):
        B, S = args.batch or SHAPES[arch]["batch"], args.seq or SHAPES[arch]["seq"]
        if args.real and arch == "t5":
            sets = {f"{args.real}-{kind}": real_batches(args.real, args.data_dir, 200, B, kind == "padded", device,
                                                        max(depths)) for kind in args.layout.split(",")}
        else:
            sets = {"random": ([random_batch(arch, B, S, SHAPES[arch]["cfg"].vocab_size, device, map_steps=max(depths))],
                               SHAPES[arch]["cfg"].vocab_size, 0)}
        for label, (data, vocab, span) in sets.items():
            for mode, keep, d in itertools.product(args.modes.split(","), keeps, depths):
                # a model with d MAP depths reads the first d of the batch's targets (none when d is 0)
                cut = [{k: v[:, :d] if k.startswith("map") else v for k, v in b.items() if d or not k.startswith("map")}
                       for b in data]
                r = time_mode(arch, mode, keep, (cut, vocab, span), args.steps, args.warmup, device, label, d)
                rows.append(r)
                base = next(x for x in rows if (x["arch"], x["mode"], x["data"], x["batch"]) ==
                            (arch, mode, label, r["batch"]))
                flops = f"{r['tflops']:6.1f} TFLOP/s " if r["tflops"] else ""  # counted for Qwen at keep 1 only
                say(f"{arch:5s} {mode:8s} {label:14s} B={r['batch']:4d} S={r['seq']:4d} keep {keep:4.2f} map {d} "
                    f"{r['ms']:8.2f} ms ({base['ms'] / r['ms']:4.2f}x) {r['samples_s']:9.0f} samples/s "
                    f"{flops}peak {r['peak_mib']:8.0f} MiB "
                    f"({r['peak_mib'] / base['peak_mib'] - 1:+.0%} vs the first row) setup {r['setup_s']:.0f} s",
                    flush=True)
        for keep in keeps if args.profile else []:
            profile(arch, args.profile, B, S, device, keep)
    if args.out and rank == 0:
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, argv=sys.argv)
        json.dump(dict(meta=meta, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
