"""Train a generative recommender on semantic IDs."""
import torch


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
            loss = self.loss_fn(batch)
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
        return loss.detach()

    def __call__(self, batch):
        """Run one step on `batch` (a dict of tensors on the device); returns the loss (a GPU tensor)."""
        if not self.graph:
            loss = self._step(batch)
            self.opt.zero_grad(set_to_none=True)
            return loss
        key = tuple((k, tuple(v.shape)) for k, v in batch.items())
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)
        graph, static, loss = self.graphs[key]
        for k, v in batch.items():
            static[k].copy_(v)
        graph.replay()
        return loss.clone()

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
            loss = self._step(static)
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
            for p, state in self.opt.state.items():
                for k, t in state.items():
                    t.copy_(state_before[p][k]) if p in state_before else t.zero_()
        return graph, static, loss
