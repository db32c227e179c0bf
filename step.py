"""One optimiser step, fast on a GPU: forward and loss under autocast, backward, gradient clipping,
AdamW (or Adam); compiled, and captured as a CUDA graph where it can be. train.py and bench.py drive it."""
import contextlib

import torch

import dist


def precision(device, amp=True):
    """(autocast dtype or None, whether a gradient scaler is needed, the reason, for the start-up log)."""
    if device.type != "cuda":
        return None, False, "fp32: no CUDA device"
    if not amp:
        return None, False, "fp32: --no-amp"
    name, cap = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False, f"bf16 autocast: {name} (SM {cap[0]}{cap[1]}) supports it"
    return torch.float16, True, f"fp16 autocast with a gradient scaler: {name} (SM {cap[0]}{cap[1]}) has no bf16"


class Step:
    """One optimiser step: forward and loss under autocast, backward, gradient clipping, AdamW (or Adam).

    A step takes a list of micro-batches and accumulates their gradients (their mean loss); under
    torchrun the loss runs through DDP (dist.wrap), whose all-reduce is skipped on all but the last.
    compile: torch.compile the model's loss (forward and backward become fused Triton kernels).
    graph: also capture the whole step, optimiser included, as one CUDA graph per batch shape and
    replay it. Small models such as GRID's T5 are bound by kernel launches, not arithmetic; a
    replay launches the step's hundreds of kernels at once. The learning rate then lives on the
    GPU as a tensor, so a schedule can change it between replays without a new capture. Graphs
    take one micro-batch on one process: a captured step cannot hold DDP's communication.
    """

    def __init__(self, model, lr, weight_decay, clip, device, betas=(0.9, 0.999), compile=False, graph=False, amp=True,
                 accum=1, optimizer="adamw"):
        self.model, self.clip, self.device = model, clip, device
        self.dtype, needs_scaler, _ = precision(device, amp)
        self.ddp = dist.wrap(model)  # model.loss, or a DDP module under torchrun
        self.distributed = isinstance(self.ddp, torch.nn.Module)
        single = accum == 1 and not self.distributed
        self.graph = graph and device.type == "cuda" and not needs_scaler and single  # a scaler syncs with the CPU
        decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms and biases do not
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
        lr = torch.tensor(lr, device=device) if self.graph else lr
        # AdamW shrinks weights apart from the gradient; Adam adds weight_decay * w to the gradient
        # (L2), which Adam's per-weight scaling then rescales: GRID trains with the latter.
        opt = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        self.opt = opt(groups, lr=lr, betas=betas, fused=device.type == "cuda", capturable=self.graph)
        self.scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
        self.loss_fn = torch.compile(self.ddp) if compile else self.ddp
        self.graphs = {}  # batch shapes -> (graph, static batch, static loss)

    def set_lr(self, lr):
        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step(self, micro):
        loss, stats = 0, {}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with self.ddp.no_sync() if self.distributed and not last else contextlib.nullcontext():
                with torch.autocast(self.device.type, self.dtype or torch.float32, enabled=self.dtype is not None):
                    part, parts = self.loss_fn(batch)
                (self.scaler.scale(part / len(micro)) if self.scaler else part / len(micro)).backward()
            loss = loss + part.detach() / len(micro)
            stats = {k: stats.get(k, 0) + v / len(micro) for k, v in parts.items()}
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss, stats

    def __call__(self, micro):
        """Run one step on a batch or a list of micro-batches (dicts of tensors on the device); returns
        the mean loss and its parts (tensors on the device: reading them waits for the GPU)."""
        micro = micro if isinstance(micro, list) else [micro]
        if not self.graph:
            out = self._step(micro)
            self.opt.zero_grad(set_to_none=True)
            return out
        batch = micro[0]
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
                self._step([static])
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients at every replay
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None  # one pool for all shapes
        with torch.cuda.graph(graph, pool=pool):
            out = self._step([static])
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
