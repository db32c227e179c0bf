"""data.py: readers on small files written here, the leave-one-out split, synthetic data, errors."""

import gzip
import json
import os
import zipfile

import numpy as np
import pytest

import data
from data import DataConfig, Dataset, load_dataset, split

# Real data: $STAMP_DATA_DIR, else ../shared/data beside the checkout; tests skip when it is absent.
REAL = os.environ.get("STAMP_DATA_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def write(path, text, crlf=False):
    if crlf:
        text = text.replace("\n", "\r\n")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        f.write(text)


def seqs(ds):
    return [s.tolist() for s in ds.sequences]


# -----------------------------------------------------------------------------
# readers

def test_lcrec_gz_numeric_ids_and_missing_text(tmp_path, capsys):
    write(tmp_path / "Toy.inter.json.gz", json.dumps({"0": [2, 0, 1], "1": [10, 2, 0, 1]}))
    write(tmp_path / "Toy.item.json", json.dumps({"0": {"title": "a", "description": "x"}, "1": {"title": "b"},
                                                  "2": {"title": " "}, "10": {"title": "k"}}))
    ds = load_dataset(DataConfig(data=str(tmp_path)))
    assert ds.name == tmp_path.name
    assert ds.item_ids == ["0", "1", "2", "10"]  # numeric ids keep numeric order
    assert seqs(ds) == [[2, 0, 1], [3, 2, 0, 1]]
    assert ds.items[0] == {"title": "a", "description": "x"}
    assert ds.items[2] == {"title": "2"}  # blank text: the id stands in
    assert "1 of 4 items have no text" in capsys.readouterr().out
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 4, 7)


def test_recbole_crlf_title_ids_and_timestamp_ties(tmp_path):
    inter = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
             "u1\tHeat (1995)\t5\t30\n"
             "u1\tAlien (1979)\t3\t10\n"
             "u2\tAlien (1979)\t4\t7\n"
             "u1\tToy Story (1995)\t4\t20\n"
             "u1\tJumanji (1995)\t4\t20\n"  # same time as Toy Story: file order decides
             "u1\tBabe (1995)\t4\t20\n")
    item = ("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
            "Alien (1979)\tAlien\t1979.0\tHorror Sci-Fi\n"
            "Heat (1995)\tHeat\t1995\tAction\n"
            "Toy Story (1995)\tToy Story\t1995\tAnimation Children's\n"
            "Unrated (2000)\tUnrated\t2000\tDrama\n")
    write(tmp_path / "mini.inter.gz", inter, crlf=True)
    write(tmp_path / "mini.item", item, crlf=True)
    ds = load_dataset(DataConfig(data=str(tmp_path / "mini.inter.gz")))
    names = lambda u: [ds.item_ids[i] for i in ds.sequences[u]]
    assert names(0) == ["Alien (1979)", "Toy Story (1995)", "Jumanji (1995)", "Babe (1995)", "Heat (1995)"]
    assert names(1) == ["Alien (1979)"]
    assert ds.user_ids == ["u1", "u2"]
    assert ds.n_items == 5  # only rated items: "Unrated" is listed but never rated
    alien = ds.items[ds.item_ids.index("Alien (1979)")]
    assert alien == {"title": "Alien", "year": "1979", "genres": "Horror, Sci-Fi"}
    assert all("\r" not in v for it in ds.items for v in it.values())
    assert ds.items[ds.item_ids.index("Babe (1995)")] == {"title": "Babe (1995)"}


def test_amazon_reviews_and_literal_meta(tmp_path):
    reviews = "".join(json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t}) + "\n" for u, a, t in
                      [("A", "B002", 300), ("A", "B001", 100), ("B", "B001", 50), ("A", "B003", 300)])
    meta = ("{'asin': 'B001', 'title': \"L'Oreal Mascara\", 'brand': 'LOreal', "
            "'categories': [['Beauty', 'Makeup'], ['Beauty', 'Eyes']], 'price': 5.0}\n"
            "{'asin': 'B002', 'description': 'A brush', 'salesRank': {'Beauty': 3}}\n"
            "{'asin': 'B999', 'title': 'never reviewed'}\n")
    write(tmp_path / "reviews_Mini_5.json.gz", reviews)
    write(tmp_path / "meta_Mini.json.gz", meta)
    ds = load_dataset(DataConfig(data=str(tmp_path)))
    assert [[ds.item_ids[i] for i in s] for s in ds.sequences] == [["B001", "B002", "B003"], ["B001"]]
    text = dict(zip(ds.item_ids, ds.items))
    assert text["B001"] == {"title": "L'Oreal Mascara", "brand": "LOreal", "categories": "Beauty, Makeup, Eyes"}
    assert text["B002"] == {"description": "A brush"}
    assert text["B003"] == {"title": "B003"}  # no metadata: the id stands in


def ml1m_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ml-1m/ratings.dat", "1::10::5::978300760\n1::20::3::978300000\n2::10::4::5\n")
        z.writestr("ml-1m/movies.dat", "10::Crème Brûlée, The (1995)::Comedy|Drama\n20::Heat (1995)::Action\n"
                   .encode("latin-1"))


def test_grouplens_zip_latin1(tmp_path):
    ml1m_zip(tmp_path / "ml-1m.zip")
    ds = load_dataset(DataConfig(data=str(tmp_path / "ml-1m.zip")))
    assert [[ds.item_ids[i] for i in s] for s in ds.sequences] == [["20", "10"], ["10"]]
    assert ds.items[0] == {"title": "Crème Brûlée, The", "year": "1995", "genres": "Comedy, Drama"}


def test_kcore():
    users = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    items = np.array([0, 1, 2, 0, 1, 0, 1, 3])
    # k=2: items 2 and 3 have one interaction each; then every user still has 2 or more.
    assert data.kcore_filter(users, items, 2).tolist() == [1, 1, 0, 1, 1, 1, 1, 0]
    # k=3: items 2, 3 go, and user 1; then users 0 and 2 have 2 left: everything goes.
    assert not data.kcore_filter(users, items, 3).any()


def test_download_when_absent_and_message_without_network(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "_download", lambda url, dest: (calls.append(url), os.makedirs(os.path.dirname(dest),
                                                              exist_ok=True), ml1m_zip(dest)))
    ds = load_dataset(DataConfig(data="ml-1m", data_dir=str(tmp_path)))
    assert calls == [data.ML1M_URL] and ds.n_interactions == 3

    def offline(url, dest):
        raise OSError("no network")
    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(FileNotFoundError, match=r"^beauty: no data in .*beauty and the download failed \(no network\); "
                       r"put reviews_Beauty_5.json.gz and meta_Beauty.json.gz \(from http://snap.*\) in .*beauty$"):
        load_dataset(DataConfig(data="beauty", data_dir=str(tmp_path)))


# -----------------------------------------------------------------------------
# bad input: one line saying what is wrong and what to do

def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown dataset 'beauti': use beauty, sports, toys, ml-1m, ml-100k, "
                                         r"synthetic, or the path"):
        load_dataset(DataConfig(data="beauti"))
    write(tmp_path / "bad.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\ti\n")
    with pytest.raises(ValueError, match=r"bad.inter:3: expected 3 tab-separated fields, got 2; fix or remove the line$"):
        load_dataset(DataConfig(data=str(tmp_path / "bad.inter")))
    write(tmp_path / "reviews_X_5.json", json.dumps({"reviewerID": "a", "asin": "b", "unixReviewTime": 1}) + "\n")
    write(tmp_path / "meta_X.json", "{'asin': 'b', 'title': 'ok'}\n{'asin': 'b', 'title': \n")
    with pytest.raises(ValueError, match=r"meta_X.json:2: malformed metadata line"):
        load_dataset(DataConfig(data=str(tmp_path / "reviews_X_5.json")))
    write(tmp_path / "B.inter.json", '{"0": [1, 2],\n "1": [1 2]}')
    with pytest.raises(ValueError, match=r"B.inter.json:2: malformed JSON"):
        load_dataset(DataConfig(data=str(tmp_path / "B.inter.json")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty: no dataset files found"):
        load_dataset(DataConfig(data=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match=r"^ml-100k: no files in "):
        load_dataset(DataConfig(data="ml-100k", data_dir=str(tmp_path)))


# -----------------------------------------------------------------------------
# split

def hand_made():
    # users with 2 (dropped), 3, 4 and 6 items; item = 10 * user + position, so rows are readable
    return Dataset("hand", [np.arange(n) + 10 * u for u, n in enumerate([2, 3, 4, 6])],
                   [{"title": str(i)} for i in range(60)], [str(i) for i in range(60)])


def test_split_counts_and_windows(capsys):
    sp = split(hand_made(), DataConfig(max_items=2, augment=True))
    assert "dropped 1 users with fewer than 3 items" in capsys.readouterr().out
    # Training targets at positions 1..n-3: 0 + 1 + 3 samples.
    assert sp.train_user.tolist() == [2, 3, 3, 3]
    assert sp.train_pos.tolist() == [1, 1, 2, 3]
    assert sp.train_target.tolist() == [21, 31, 32, 33]
    assert sp.train_hist.tolist() == [[20, -1], [30, -1], [30, 31], [31, 32]]  # cut to the last 2
    assert sp.train_len.tolist() == [1, 1, 2, 2]
    assert sp.valid_target.tolist() == [11, 22, 34] and sp.test_target.tolist() == [12, 23, 35]
    assert sp.valid_hist.tolist() == [[10, -1], [20, 21], [32, 33]]
    assert sp.test_hist.tolist() == [[10, 11], [21, 22], [33, 34]]
    assert sp.valid_user.tolist() == sp.test_user.tolist() == [1, 2, 3]
    assert [s.tolist() for s in sp.train_seqs] == [[10], [20, 21], [30, 31, 32, 33]]
    assert all(a.dtype == np.int64 for a in (sp.train_hist, sp.train_len, sp.train_pos, sp.test_hist))

    sp = split(hand_made(), DataConfig(max_items=30, augment=False))
    assert sp.train_target.tolist() == [21, 33] and sp.train_pos.tolist() == [1, 3]
    assert sp.train_hist[1, :4].tolist() == [30, 31, 32, -1] and sp.train_hist.shape == (2, 30)


def test_no_training_sample_uses_validation_or_test_items():
    ds = load_dataset(DataConfig(data="synthetic", synthetic_users=300))
    for augment in (True, False):
        sp = split(ds, DataConfig(data="synthetic", max_items=5, augment=augment))
        n = np.array([len(ds.sequences[u]) for u in sp.train_user])
        assert (sp.train_pos <= n - 3).all()  # targets only from the training part
        for row in range(len(sp.train_target)):
            seq, p, k = ds.sequences[sp.train_user[row]], sp.train_pos[row], sp.train_len[row]
            assert sp.train_target[row] == seq[p]
            assert sp.train_hist[row, :k].tolist() == seq[p - k:p].tolist() and (sp.train_hist[row, k:] == -1).all()


# -----------------------------------------------------------------------------
# synthetic data

def test_synthetic_deterministic_and_structured():
    cfg = DataConfig(data="synthetic", synthetic_users=500, synthetic_items=200, synthetic_clusters=10)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert seqs(a) == seqs(b) and np.array_equal(a.embeddings, b.embeddings)
    c = load_dataset(DataConfig(data="synthetic", synthetic_users=500, synthetic_items=200, synthetic_clusters=10,
                                synthetic_seed=1))
    assert seqs(a) != seqs(c)
    assert a.embeddings.shape == (200, 384) and np.allclose(np.linalg.norm(a.embeddings, axis=1), 1, atol=1e-5)
    assert all(5 <= len(s) <= 30 for s in a.sequences) and a.n_items == 200
    # Structure a model can learn: the next item is predictable from the last far beyond popularity.
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in a.sequences])
    top = np.zeros((200, 200))
    np.add.at(top, (pairs[:, 0], pairs[:, 1]), 1)
    by_last = (top.max(1)).sum() / len(pairs)             # best guess given the last item
    by_pop = np.bincount(pairs[:, 1]).max() / len(pairs)  # best single guess
    assert by_last > 5 * by_pop


# -----------------------------------------------------------------------------
# real data: the counts in ../shared/data/README.md

def real(name):
    if not os.path.isdir(os.path.join(REAL, name)):
        pytest.skip(f"no real data in {REAL}")
    return load_dataset(DataConfig(data=name, data_dir=REAL))


def test_real_beauty():
    ds = real("beauty")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (22_363, 12_101, 198_502)
    assert ds.item_ids[:3] == ["0", "1", "2"] and ds.sequences[0].tolist() == [0, 1, 2, 3, 4]
    sp = split(ds, DataConfig())
    assert len(sp.train_target) == 198_502 - 3 * 22_363 == 131_413
    assert len(sp.test_target) == 22_363


def test_real_movielens():
    ds = real("ml-100k")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1_682, 100_000)
    assert set(ds.items[0]) <= {"title", "year", "genres"}
    ds = real("ml-1m")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (6_040, 3_706, 1_000_209)
