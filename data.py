"""
Datasets for semantic-ID recommendation: readers for the formats people ship them in, the
leave-one-out split with TIGER/GRID's sliding-window augmentation, and a synthetic set with known
structure for tests and quick CPU runs.

Data flows one way: data -> sid -> model. A Dataset here is only each user's chronological item
sequence plus each item's text; sid.py turns the text into semantic IDs, and `Tokens` (at the end)
turns batches of item indices into model inputs through a SID table, on the device.

Formats (every file may also be gzipped, `<file>.gz`):
  LC-Rec JSON     <Name>.inter.json {"user": [item, ...]}, <Name>.item.json {"item": {"title": ...}}
  RecBole atomic  <name>.inter, <name>.item: tab-separated, typed headers ("item_id:token"), CRLF ok
  Amazon 2014     reviews_<Category>_5.json (JSON lines), meta_<Category>.json (Python literal lines)
  GroupLens       ml-1m.zip: ratings.dat, movies.dat ("::"-separated, latin-1)

    python data.py --data beauty --data-dir ../shared/data     # prints dataset and split statistics
"""

import argparse
import ast
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

# The three Amazon 2014 categories of the TIGER/GRID benchmarks, by their file names.
AMAZON = {"beauty": "Beauty", "sports": "Sports_and_Outdoors", "toys": "Toys_and_Games"}
AMAZON_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
# Where a machine without the files gets them: the original releases.
ORIGINALS = {"ml-1m": [ML1M_URL], **{name: [f"{AMAZON_URL}reviews_{cat}_5.json.gz", f"{AMAZON_URL}meta_{cat}.json.gz"]
                                     for name, cat in AMAZON.items()}}


def default_data_dir() -> str:
    return os.environ.get("STAMP_DATA_DIR", "data")


@dataclass
class DataConfig:
    data: str = field(default="beauty", metadata={
        "help": "dataset: beauty|sports|toys|ml-1m|ml-100k|synthetic, or a path to a folder or file"})
    data_dir: str = field(default_factory=default_data_dir, metadata={
        "help": "folder holding one sub-folder per dataset (default: $STAMP_DATA_DIR, else ./data)"})
    max_items: int = field(default=30, metadata={
        "help": "history length: each sample sees at most its last max_items items (GRID: 30)"})
    augment: bool = field(default=True, metadata={
        "help": "train on every prefix of each user's training part (TIGER/GRID), else one sample per user"})
    kcore: int = field(default=0, metadata={
        "help": "drop users and items with fewer than k interactions, repeatedly (0: no filtering)"})
    synthetic_users: int = field(default=2000, metadata={"help": "synthetic data: number of users"})
    synthetic_items: int = field(default=500, metadata={"help": "synthetic data: number of items"})
    synthetic_clusters: int = field(default=20, metadata={
        "help": "synthetic data: latent item clusters users move between"})
    synthetic_seed: int = field(default=0, metadata={"help": "synthetic data: random seed"})

    def __post_init__(self):
        if self.max_items < 1:
            raise ValueError(f"--max-items {self.max_items} is below 1: a sample needs a history; use 1 or more (GRID: 30)")


@dataclass
class Dataset:
    name: str
    sequences: list[np.ndarray]      # per user: chronological int64 item indices in [0, n_items)
    items: list[dict[str, str]]      # per item: text fields (title, description, ... / title, year, genres)
    item_ids: list[str]              # per item: its id in the source files
    user_ids: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None  # (n_items, D) unit-norm; only synthetic data carries its own

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


# -----------------------------------------------------------------------------
# readers: each takes its main file (companions are found beside it) and returns a Dataset
# through _build, which orders, filters and numbers the interactions

def _open(path: str):
    """Text mode, gzipped or not; universal newlines turn CRLF into LF."""
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _companion(path: str, old: str, new: str) -> str | None:
    """The file beside `path` with suffix `old` replaced by `new` (.inter -> .item), gzipped or not."""
    base = os.path.join(os.path.dirname(path), os.path.basename(path).removesuffix(".gz").removesuffix(old) + new)
    return next((p for p in (base, base + ".gz") if os.path.isfile(p)), None)


def _load_json(path: str):
    try:
        with _open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file or download it again") from None


def read_lcrec(path: str, name: str, kcore: int = 0) -> Dataset:
    """LC-Rec JSON: each user's list is already chronological, so file order is time order."""
    users, items, obj = [], [], _load_json(path)
    if bad := next((u for u, seq in obj.items() if not isinstance(seq, list)), None):
        raise ValueError(f"{path}: user {bad!r} has {obj[bad]!r}, not a list of items; fix the file or download it again")
    if empty := sum(not seq for seq in obj.values()):
        print(f"{name}: dropped {empty:,} users with no items")
    for user, seq in obj.items():
        users += [user] * len(seq)
        items += [str(i) for i in seq]
    item_path = _companion(path, ".inter.json", ".item.json")
    return _build(name, users, items, None, _load_json(item_path) if item_path else {}, kcore)


# RecBole's field names -> ours, so MovieLens items read the same from any source.
RECBOLE_FIELDS = {"movie_title": "title", "release_year": "year", "genre": "genres", "class": "genres"}


def _read_tsv(path: str, required: tuple[str, ...], numeric: str = "") -> list[dict[str, str | float]]:
    """RecBole atomic file: a header of `name:type` columns, then tab-separated rows."""
    with _open(path) as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        if missing := [c for c in required if c not in header]:
            raise ValueError(f"{path}: no {missing[0]} column in the header {header}; is this a RecBole file?")
        rows = []
        for lineno, line in enumerate(f, 2):
            if not line.strip():
                continue
            values = line.rstrip("\n").split("\t")
            if len(values) != len(header):
                raise ValueError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, got "
                                 f"{len(values)}; fix or remove the line")
            row = dict(zip(header, values))
            if numeric in row:
                try:
                    row[numeric] = float(row[numeric])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: {numeric} {row[numeric]!r} is not a number; "
                                     "fix or remove the line") from None
            rows.append(row)
    return rows


def read_recbole(path: str, name: str, kcore: int = 0) -> Dataset:
    rows = _read_tsv(path, ("user_id", "item_id"), numeric="timestamp")
    times = np.array([r["timestamp"] for r in rows]) if rows and "timestamp" in rows[0] else None
    texts = {}
    if item_path := _companion(path, ".inter", ".item"):
        for r in _read_tsv(item_path, ("item_id",)):
            rec = {RECBOLE_FIELDS.get(k, k): v for k, v in r.items() if k != "item_id"}
            rec["year"] = rec.get("year", "").removesuffix(".0")  # release_year:float writes 1995.0
            rec["genres"] = ", ".join(rec.get("genres", "").split())
            texts[r["item_id"]] = rec
    return _build(name, [r["user_id"] for r in rows], [r["item_id"] for r in rows], times, texts, kcore)


def read_amazon(path: str, name: str, kcore: int = 0) -> Dataset:
    """Amazon 2014 (McAuley): 5-core review lines are JSON; metadata lines are Python literals."""
    users, items, times = [], [], []
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                users.append(r["reviewerID"]), items.append(r["asin"]), times.append(float(r["unixReviewTime"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: malformed review line (need a JSON object with reviewerID, "
                                 "asin, unixReviewTime); fix the file or download it again") from None
    texts = {}
    category = os.path.basename(path).removesuffix(".gz").removeprefix("reviews_").removesuffix("_5.json")
    if meta_path := _companion(os.path.join(os.path.dirname(path), f"meta_{category}"), "", ".json"):
        needed, asin = set(items), re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")
        with _open(meta_path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip() or ((m := asin.search(line)) and m.group(1) not in needed):
                    continue  # the items nobody reviewed: skip them before paying for literal_eval
                try:
                    r = ast.literal_eval(line)
                except (ValueError, SyntaxError, MemoryError):
                    r = None
                if not isinstance(r, dict) or "asin" not in r:
                    raise ValueError(f"{meta_path}:{lineno}: malformed metadata line (need a Python dict "
                                     "literal with an asin); fix the file or download it again")
                # categories are paths such as [["Beauty", "Makeup", "Eyes"]]: keep each name once
                cats = dict.fromkeys(c for p in r.get("categories", []) for c in p)
                texts[r["asin"]] = {"title": r.get("title", ""), "brand": r.get("brand", ""),
                                    "categories": ", ".join(cats), "description": r.get("description", "")}
    return _build(name, users, items, np.array(times), texts, kcore)


def read_grouplens(path: str, name: str, kcore: int = 0) -> Dataset:
    """GroupLens ml-1m.zip: ratings.dat `user::movie::rating::time`, movies.dat `movie::Title (1995)::A|B`."""
    with zipfile.ZipFile(path) as z:
        members = {os.path.basename(m): m for m in z.namelist()}
        if "ratings.dat" not in members:
            raise ValueError(f"{path}: no ratings.dat inside; download {ML1M_URL} again")
        ratings = z.read(members["ratings.dat"]).decode("latin-1").splitlines()
        movies = z.read(members["movies.dat"]).decode("latin-1").splitlines() if "movies.dat" in members else []
    rows, movies = [line.split("::") for line in ratings], [line.split("::") for line in movies]
    for file, lines, shape in (("ratings.dat", rows, "user::movie::rating::time"), ("movies.dat", movies, "movie::title::genres")):
        n = shape.count("::") + 1
        if bad := next((i for i, r in enumerate(lines, 1) if len(r) != n or n == 4 and not r[3].strip().isdigit()), None):
            raise ValueError(f"{path}:{file}:{bad}: expected {shape}; download {ML1M_URL} again")
    texts = {}
    for movie, title, genres in movies:
        m = re.fullmatch(r"(.*) \((\d{4})\)\s*", title)
        texts[movie] = {"title": m.group(1) if m else title, "year": m.group(2) if m else "",
                        "genres": ", ".join(genres.split("|"))}
    return _build(name, [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[3]) for r in rows]),
                  texts, kcore)


def _index(ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Dense int64 codes for string ids. Numeric ids keep their numeric order (so Beauty's item 7 is
    index 7 and published SID tables line up); other ids are numbered in order of first appearance."""
    uniq = list(dict.fromkeys(ids))
    if all(s.isdigit() for s in uniq):
        uniq.sort(key=int)
    lookup = {s: n for n, s in enumerate(uniq)}
    return np.fromiter((lookup[s] for s in ids), np.int64, len(ids)), uniq


def kcore_filter(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of interactions left after repeatedly removing users and items with < k of them."""
    keep = np.ones(len(users), bool)
    while k > 0:
        bad = keep & ((np.bincount(users[keep], minlength=users.max() + 1)[users] < k)
                      | (np.bincount(items[keep], minlength=items.max() + 1)[items] < k))
        if not bad.any():
            break
        keep &= ~bad
    return keep


def _build(name, users, items, times, texts, kcore) -> Dataset:
    if not users:
        raise ValueError(f"{name}: no interactions found; check the data files")
    u, user_ids = _index(users)
    i, item_ids = _index(items)
    keep = kcore_filter(u, i, kcore)
    if not keep.all():
        print(f"{name}: {kcore}-core filtering kept {keep.sum():,} of {len(keep):,} interactions")
    times = np.arange(len(u), dtype=np.float64) if times is None else np.asarray(times, np.float64)
    u, i, times = u[keep], i[keep], times[keep]
    # Renumber the survivors densely, keeping their order.
    used_u, u = np.unique(u, return_inverse=True)
    used_i, i = np.unique(i, return_inverse=True)
    # Sort by (user, time); lexsort is stable, so interactions with the same timestamp keep file order.
    order = np.lexsort((times, u))
    sequences = np.split(i[order].astype(np.int64), np.flatnonzero(np.diff(u[order])) + 1)
    item_ids = [item_ids[n] for n in used_i]
    text = [{k: str(v).strip() for k, v in (texts.get(iid) or {}).items() if str(v).strip()} for iid in item_ids]
    if missing := sum(not t for t in text):
        print(f"{name}: {missing:,} of {len(item_ids):,} items have no text; their id stands in as the title")
    text = [t or {"title": iid} for t, iid in zip(text, item_ids)]
    return Dataset(name, sequences, text, item_ids, [user_ids[n] for n in used_u])


# -----------------------------------------------------------------------------
# selection by name or path

# (file pattern, reader), tried in this order; each pattern also matches its .gz
FORMATS = [("*.inter.json", read_lcrec), ("*.inter", read_recbole), ("reviews_*_5.json", read_amazon),
           ("*.zip", read_grouplens)]


def read_path(path: str, name: str | None = None, kcore: int = 0) -> Dataset | None:
    """The dataset in a folder (whichever known format it holds) or behind one of its files; None if
    the folder holds none."""
    folder, only = (path, None) if os.path.isdir(path) else (os.path.dirname(path) or ".", os.path.basename(path))
    name = name or os.path.basename(os.path.normpath(path)).split(".")[0]
    for pattern, reader in FORMATS:
        hits = sorted(glob.glob(os.path.join(folder, pattern)) + glob.glob(os.path.join(folder, pattern + ".gz")))
        hits = [h for h in hits if only in (None, os.path.basename(h))]
        if hits:
            return reader(hits[0], name, kcore)
    if only:
        raise ValueError(f"{path}: unknown format; give a .inter.json (LC-Rec), .inter (RecBole), "
                         "reviews_<Category>_5.json (Amazon 2014) or .zip (GroupLens) file, or their folder")
    return None


def _download(url: str, dest: str) -> None:
    """Fetch url to dest through a temporary file, so an interrupted download leaves nothing behind."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    print(f"downloading {url} -> {dest}")
    urllib.request.urlretrieve(url, dest + ".part")
    os.replace(dest + ".part", dest)


def load_dataset(cfg: DataConfig) -> Dataset:
    name = cfg.data
    if name == "synthetic":
        return make_synthetic(cfg)
    if name not in ORIGINALS and name != "ml-100k":
        if not os.path.exists(name):
            raise ValueError(f"unknown dataset {name!r}: use beauty, sports, toys, ml-1m, ml-100k, synthetic, "
                             "or the path to a dataset folder or file")
        if (ds := read_path(name, kcore=cfg.kcore)) is None:
            raise FileNotFoundError(f"{name}: no dataset files found (*.inter.json, *.inter, reviews_*_5.json "
                                    "or *.zip); point --data at a folder that has them")
        return ds
    # ./data, the default, is made by the first download; a folder named on purpose but missing is a typo.
    if cfg.data_dir != "data" and not os.path.isdir(cfg.data_dir):
        raise FileNotFoundError(f"--data-dir {cfg.data_dir} does not exist: point it (or $STAMP_DATA_DIR) at the "
                                f"folder that holds {name}/, or create it")
    folder = os.path.join(cfg.data_dir, name)
    if os.path.isdir(folder) and (ds := read_path(folder, name, cfg.kcore)) is not None:
        return ds
    if name == "ml-100k":
        raise FileNotFoundError(f"ml-100k: no files in {folder}; put RecBole's ml-100k.inter and ml-100k.item "
                                "there (from the recbole wheel on PyPI: recbole/dataset_example/ml-100k/)")
    # Nothing there yet: fetch the originals from their official locations, if we can.
    urls = ORIGINALS[name]
    files = [os.path.basename(u) for u in urls]
    try:
        for f, url in zip(files, urls):
            _download(url, os.path.join(folder, f))
    except OSError as e:
        raise FileNotFoundError(f"{name}: no data in {folder} and the download failed ({e}); put "
                                f"{' and '.join(files)} (from {' and '.join(urls)}) in {folder}") from None
    return read_path(folder, name, cfg.kcore)


# -----------------------------------------------------------------------------
# synthetic data with known structure

def make_synthetic(cfg: DataConfig) -> Dataset:
    """Items in latent clusters, each with sub-clusters, so residual quantisation has levels to find;
    users walk a Markov chain over clusters with item popularity inside a cluster, and often move to
    an item's fixed "follow-up" (a sequel, the matching conditioner): a model that reads the history
    beats popularity by a wide margin. Embeddings are unit-norm 384-d, like MiniLM's."""
    rng = np.random.default_rng(cfg.synthetic_seed)
    n_users, n_items, n_clusters, dim, n_sub = cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_clusters, 384, 4
    if n_items < n_clusters or n_clusters < 1 or n_users < 1:
        raise ValueError(f"synthetic data needs users >= 1 and items >= clusters >= 1; got {n_users} users, "
                         f"{n_items} items, {n_clusters} clusters")

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    cluster = rng.permutation(np.arange(n_items) % n_clusters)
    sub = rng.integers(n_sub, size=n_items)
    centres = unit(rng.normal(size=(n_clusters, dim)))
    sub_centres = unit(centres[:, None] + 0.7 * unit(rng.normal(size=(n_clusters, n_sub, dim))))
    emb = unit(sub_centres[cluster, sub] + 0.5 * unit(rng.normal(size=(n_items, dim))))

    # Cluster transitions: stay, go to the "next" cluster, or a few favourites; a little uniform mass.
    trans = np.full((n_clusters, n_clusters), 0.1 / n_clusters)
    trans[np.arange(n_clusters), np.arange(n_clusters)] += 0.4
    trans[np.arange(n_clusters), (np.arange(n_clusters) + 1) % n_clusters] += 0.3
    trans[np.arange(n_clusters)[:, None], rng.integers(n_clusters, size=(n_clusters, 2))] += 0.1
    trans_cdf = np.cumsum(trans / trans.sum(1, keepdims=True), 1)
    # Zipf popularity within each cluster; members padded with their cluster's first item.
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    width = max(len(m) for m in members)
    member = np.stack([np.pad(m, (0, width - len(m)), mode="edge") for m in members])
    pop = np.stack([np.pad(1.0 / np.arange(1, len(m) + 1), (0, width - len(m))) for m in members])
    pop_cdf = np.cumsum(pop / pop.sum(1, keepdims=True), 1)
    nxt = (cluster + 1) % n_clusters
    follow = member[nxt, rng.integers(0, np.array([len(m) for m in members])[nxt])]

    def pick_item(c):
        k = (rng.random(len(c))[:, None] > pop_cdf[c]).sum(1)
        return member[c, np.minimum(k, width - 1)]
    lengths = rng.integers(5, 31, size=n_users)
    seqs = np.zeros((n_users, lengths.max()), np.int64)
    seqs[:, 0] = pick_item(rng.integers(n_clusters, size=n_users))
    for t in range(1, lengths.max()):
        last = seqs[:, t - 1]
        c = (rng.random(n_users)[:, None] > trans_cdf[cluster[last]]).sum(1).clip(max=n_clusters - 1)
        seqs[:, t] = np.where(rng.random(n_users) < 0.3, follow[last], pick_item(c))
    items = [{"title": f"item {i}", "categories": f"cluster {cluster[i]}, group {sub[i]}"} for i in range(n_items)]
    return Dataset("synthetic", [seqs[n, :lengths[n]] for n in range(n_users)], items,
                   [str(i) for i in range(n_items)], [str(u) for u in range(n_users)], emb.astype(np.float32))


# -----------------------------------------------------------------------------
# leave-one-out split

@dataclass
class Split:
    """Leave-one-out samples; `*_hist` rows hold item indices oldest to newest, padded with -1 at the end."""
    train_hist: np.ndarray    # (N, max_items)
    train_len: np.ndarray     # (N,) real items in each history
    train_target: np.ndarray  # (N,)
    train_user: np.ndarray    # (N,) index into Dataset.sequences
    train_pos: np.ndarray     # (N,) position of the target in the user's full sequence
    valid_hist: np.ndarray    # (U, max_items) one row per user: the items before the second-to-last
    valid_len: np.ndarray
    valid_target: np.ndarray
    valid_user: np.ndarray
    test_hist: np.ndarray     # (U, max_items): all items before the last, the validation item included
    test_len: np.ndarray
    test_target: np.ndarray
    test_user: np.ndarray
    train_seqs: list[np.ndarray]  # per kept user: the training part (everything but the last two items)


def _windows(flat, starts, pos, max_items):
    """History rows: flat[max(start, pos - max_items) : pos], left-aligned, -1 padded. (N, max_items)"""
    lo = np.maximum(starts, pos - max_items)
    length = pos - lo
    idx = lo[:, None] + np.arange(max_items)[None, :]
    hist = np.where(np.arange(max_items)[None, :] < length[:, None], flat[np.minimum(idx, len(flat) - 1)], -1)
    return hist.astype(np.int64), length.astype(np.int64)


def split(ds: Dataset, cfg: DataConfig) -> Split:
    lengths = np.array([len(s) for s in ds.sequences], np.int64)
    users = np.flatnonzero(lengths >= 3)
    if len(users) < len(lengths):
        print(f"{ds.name}: dropped {len(lengths) - len(users):,} users with fewer than 3 items "
              "(leave-one-out needs a training, a validation and a test item)")
    if not (lengths >= 4).any():
        raise ValueError(f"{ds.name}: no user has 4 or more items, so there is no training sample (leave-one-out "
                         "holds out 2 per user); use a dataset with longer sequences")
    flat = np.concatenate([ds.sequences[u] for u in users]).astype(np.int64)
    n = lengths[users]
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    ends = starts + n
    m = cfg.max_items
    # Training targets sit at positions 1 .. n-3 of each user (the training part is 0 .. n-3):
    # with augment every one of them, without it only the last.
    first = np.ones_like(n) if cfg.augment else np.maximum(n - 3, 1)
    count = np.maximum(n - 2 - first, 0)
    owner = np.repeat(np.arange(len(users)), count)
    pos = first[owner] + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    gpos = starts[owner] + pos
    train_hist, train_len = _windows(flat, starts[owner], gpos, m)
    valid_hist, valid_len = _windows(flat, starts, ends - 2, m)
    test_hist, test_len = _windows(flat, starts, ends - 1, m)
    return Split(
        train_hist, train_len, flat[gpos], users[owner].astype(np.int64), pos.astype(np.int64),
        valid_hist, valid_len, flat[ends - 2], users.astype(np.int64),
        test_hist, test_len, flat[ends - 1], users.astype(np.int64),
        [ds.sequences[u][:-2].astype(np.int64) for u in users],
    )


# -----------------------------------------------------------------------------
# model inputs: item indices -> SID tokens, built on the device per batch by one gather

PAD, BOS, SEP = 0, 1, 2  # special tokens; code c of column l is token offsets[l] + c


class Tokens:
    """The token layout of a SID table: each code column (level, then disambiguation) owns its own
    token range after the special tokens, so the model can tell a level-1 code from a level-2 one.

    Samples stay item indices (a few MB for any of our datasets, kept on the GPU); a batch becomes
    tokens by gathering rows of `item_tokens`, so a SID table can change without re-tokenising."""

    def __init__(self, codes, sizes, device="cpu", sep=True):
        self.sep = sep  # t5: a separator token after each history item
        self.sizes = list(sizes)
        self.offsets = [3 + sum(self.sizes[:l]) for l in range(len(self.sizes))]
        self.vocab_size = 3 + sum(self.sizes)
        self.n_codes = len(self.sizes)
        tokens = torch.as_tensor(np.asarray(codes), dtype=torch.long) + torch.tensor(self.offsets)
        # one extra all-PAD row at index -1, so that padded history slots (-1) gather padding
        self.item_tokens = torch.cat([tokens, torch.full((1, self.n_codes), PAD)]).to(device)

    def history_len(self, arch, items):
        """Input tokens of a history of `items` items: t5's encoder (a SEP after each item) or qwen's."""
        return items * (self.n_codes + (arch == "t5" and self.sep))

    def t5(self, hist, target=None):
        """Encoder: the history's SIDs flattened, a SEP after each item; decoder: BOS then the target
        SID without its last code; labels: the target SID. hist (B, H) left-aligned, -1 padded."""
        tok = self.item_tokens[hist]  # (B, H, L)
        if self.sep:
            tok = torch.cat([tok, torch.where(hist >= 0, SEP, PAD)[..., None]], -1)
        enc = tok.flatten(1)
        if target is None:  # generation: the encoder side only
            return {"enc": enc, "enc_mask": enc != PAD}
        tgt = self.item_tokens[target]  # (B, L)
        dec = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)
        return {"enc": enc, "enc_mask": enc != PAD, "dec": dec, "labels": tgt}

    def qwen(self, hist, length, target):
        """One right-padded sequence: history SIDs, SEP, target SID, padding. The states at the SEP
        and the first L-1 target tokens (pred_pos) predict the L target codes (labels)."""
        B, H = hist.shape
        L = self.n_codes
        ids = torch.cat([self.item_tokens[hist].flatten(1), hist.new_full((B, 1 + L), PAD)], 1)
        sep = (length * L)[:, None]  # (B, 1): where each row's history ends
        ar = torch.arange(1 + L, device=hist.device)
        ids = ids.scatter(1, sep + ar, torch.cat([torch.full_like(sep, SEP), self.item_tokens[target]], 1))
        # SAP's prior (sap.py): history tokens are candidates, separator and target always stay, padding never
        t = torch.arange(ids.size(1), device=ids.device)[None]
        prior = torch.where(t < sep, 0.0, torch.where(t <= sep + L, math.inf, -math.inf))
        return {"ids": ids, "pred_pos": sep + ar[:L], "labels": self.item_tokens[target], "prior": prior}

    def qwen_prompt(self, hist, length):
        """Generation prompt: history SIDs then SEP, left-padded so that every row ends at its SEP,
        with its mask and SAP's prior. (B, H*L + 1) each."""
        B, H = hist.shape
        L = self.n_codes
        flat = self.item_tokens[hist].flatten(1)  # real tokens first
        shift = ((H - length) * L)[:, None]  # (B, 1) padding in front
        src = torch.arange(H * L, device=hist.device)[None] - shift
        ids = torch.where(src >= 0, flat.gather(1, src.clamp(min=0)), PAD)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], SEP)], 1)
        mask = torch.cat([src >= 0, torch.ones_like(src[:, :1], dtype=torch.bool)], 1)
        prior = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)
        prior[:, -1] = math.inf  # SAP never drops the separator
        return {"ids": ids, "mask": mask, "prior": prior}


def length_buckets(lengths, max_items, n):
    """History lengths that a few static shapes cover: equal-count quantiles of the samples' lengths,
    the last one max_items. Each batch is cut to its bucket, so short histories cost little."""
    q = np.quantile(lengths, np.arange(1, n + 1) / n, method="higher")
    return sorted(set(int(x) for x in q[:-1]) | {int(max_items)})


def batches(lengths, buckets, batch_size, generator):
    """One epoch of batches as (index tensor, bucket length): samples shuffled within their bucket,
    cut into full batches (the remainder waits for a later epoch's shuffle), batches shuffled."""
    lengths = torch.as_tensor(lengths)
    b = torch.bucketize(lengths, torch.tensor(buckets))
    out = []
    for i, h in enumerate(buckets):
        idx = torch.nonzero(b == i).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        out += [(chunk, h) for chunk in idx.split(batch_size) if len(chunk) == batch_size]
    order = torch.randperm(len(out), generator=generator).tolist()
    return [out[i] for i in order]


# -----------------------------------------------------------------------------
# command line: config dataclasses become flags

def add_arguments(parser, config_cls, skip=()) -> None:
    """One --flag per dataclass field (but those in `skip`, derived elsewhere), typed by its default,
    with the field's help text."""
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f.metadata.get("help"))


def config_from_args(args: argparse.Namespace, config_cls):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def describe(ds: Dataset, sp: Split) -> str:
    lengths = np.array([len(s) for s in ds.sequences])
    return "\n".join([
        f"dataset {ds.name}: {ds.n_users:,} users, {ds.n_items:,} items, {ds.n_interactions:,} interactions, "
        f"density {ds.n_interactions / ds.n_users / ds.n_items:.5f}",
        f"sequence length: min {lengths.min()}, median {np.median(lengths):g}, mean {lengths.mean():.1f}, "
        f"max {lengths.max()}",
        f"split: {len(sp.train_target):,} training samples, {len(sp.valid_target):,} validation, "
        f"{len(sp.test_target):,} test users; mean history {sp.train_len.mean():.1f} items (cut at {sp.train_hist.shape[1]})",
        f"item text fields: {', '.join(dict.fromkeys(k for it in ds.items for k in it))}",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load a dataset and print its statistics.")
    add_arguments(parser, DataConfig)
    cfg = config_from_args(parser.parse_args(), DataConfig)
    ds = load_dataset(cfg)
    print(describe(ds, split(ds, cfg)))
