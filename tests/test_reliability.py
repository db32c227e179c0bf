"""Reliability: a killed run resumes exactly, checkpoints are never half-written, a run folder is never
overwritten by accident, and every bad input or failed step says in one line what is wrong and what to do."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import step
from data import DataConfig, load_dataset, split
from train import main, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--synthetic-users", "150", "--synthetic-items", "60", "--device", "cpu",
        "--preset", "tiny", "--codebook-size", "4", "--batch-size", "32", "--warmup-steps", "2",
        "--schedule", "constant", "--buckets", "2", "--eval-batch", "256"]


def fails(argv, match):
    with pytest.raises(SystemExit, match=match) as e:
        main(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


# ---------------------------------------------------------------------------------------------
# Bad command-line values fail before any work: nothing is written


BAD_FLAGS = [
    (["--keep", "1.5"], r"--keep 1.5 is outside \(0, 1\]: it is the fraction of input tokens SAP keeps"),
    (["--keep", "0"], r"--keep 0.0 is outside \(0, 1\]"),
    (["--keep", "0.5", "--prune-layer", "2"], r"--prune-layer 2 is outside the model's 2 blocks: use 1 to 1"),
    (["--map-steps", "-1"], r"--map-steps -1 is negative: use 0 \(off\) or the number of future items"),
    (["--levels", "0"], r"--levels and --codebook-size must be at least 1, got 0 and 4$"),
    (["--codebook-size", "0"], r"--levels and --codebook-size must be at least 1, got 3 and 0$"),
    (["--arch", "gpt"], r"^error: unknown --arch 'gpt': use t5 or qwen$"),
    (["--preset", "huge"], r"^error: unknown --preset 'huge': use paper or tiny$"),
    (["--save-every", "-1"], r"^error: --save-every -1 is below 0: use 0 or more$"),
    (["--batch-size", "0"], r"^error: --batch-size 0 is below 1: use 1 or more$"),
    (["--lr", "0"], r"^error: --lr 0.0 is not positive"),
    (["--max-items", "0"], r"^error: --max-items 0 is below 1: a sample needs a history"),
    (["--resume", "--overwrite"], r"^error: --resume and --overwrite contradict each other: pass one of them$"),
    (["--n-heads", "4", "--n-kv-heads", "3"], r"^error: --n-heads 4 is not a multiple of --n-kv-heads 3: each kv head"),
    (["--n-layers", "0"], r"^error: --d-model, --n-layers, --n-decoder-layers, --n-heads, --head-dim, --d-ff and "
                          r"--ff-layers must be at least 1$"),
    (["--ff-layers", "2", "--ffn", "swiglu"], r"^error: --ff-layers 2 needs --ffn relu \(GRID's MLP\), not swiglu$"),
    (["--level-softmax"], r"^error: --level-softmax leaves scores across levels untrained: add --beam-norm level or valid$"),
    (["--beam-norm", "best"], r"^error: unknown --beam-norm 'best': use vocab, level or valid$"),
    (["--dropout", "1.5"], r"^error: --dropout 1.5 is outside \[0, 1\)"),
    (["--beam", "0"], r"^error: --beam 0 and --eval-batch 256 must be at least 1"),
    (["--accum", "0"], r"^error: --accum 0 is below 1: use 1 or more$"),
    (["--optimizer", "sgd"], r"^error: unknown --optimizer 'sgd': use adamw or adam$"),
    (["--init", "xavier"], r"^error: unknown --init 'xavier': use hf \(Hugging Face's\) or torch \(PyTorch's layer defaults\)$"),
    (["--clip", "-1"], r"^error: --clip -1.0 or --weight-decay 0.0 is negative: use 0 \(off\) or more$"),
]


@pytest.mark.parametrize("flags, match", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_before_any_work(tmp_path, flags, match):
    out = tmp_path / "run"
    fails(TINY + flags + ["--out", str(out)], match)
    assert not out.exists()


BAD_DATA = [
    (["--data", "beauti"], r"^error: unknown dataset 'beauti': use beauty, sports, toys, ml-1m, ml-100k, synthetic"),
    (["--data", "beauty", "--data-dir", "NOPE"], r"^error: --data-dir .*nope does not exist: point it \(or \$STAMP_DATA_DIR\) "
                                                 r"at the folder that holds beauty/, or create it$"),
    (["--batch-size", "5000"], r"^error: the 2,173 training samples do not fill one step of 1 batch\(es\) of --batch-size "
                               r"5000 in the length buckets: lower --batch-size, --accum or --buckets$"),
    (["--resume"], r"^error: --resume: .*run holds no run to continue; drop --resume to start one, or fix --out$"),
]


@pytest.mark.parametrize("flags, match", BAD_DATA, ids=[" ".join(f) for f, _ in BAD_DATA])
def test_bad_data_or_run_folder_is_one_line_and_writes_nothing(tmp_path, flags, match):
    out = tmp_path / "run"
    fails(TINY + [f.replace("NOPE", str(tmp_path / "nope")) for f in flags] + ["--out", str(out)], match)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Resuming refuses another model, dataset or SID table, naming the difference


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reliability") / "run")
    main(TINY + ["--max-steps", "2", "--eval-every", "2", "--out", out])
    return out


INCOMPATIBLE = [
    (["--arch", "qwen"], r"--resume: --arch is 'qwen' here but 't5' in .*last.pt; resume with the run's settings "
                         r"\(its config.json\) or start a new run with --out$"),
    (["--d-model", "32"], r"--resume: --d-model is 32 here but 64 in .*last.pt"),
    (["--synthetic-users", "140"], r"--resume: --synthetic-users is 140 here but 150 in .*last.pt"),
    (["--sid-seed", "1"], r"--resume: the SID table built now \(\w{12}\) is not the one in .*last.pt \(\w{12}\); "
                          r"give the run's SID flags \(its config.json\) or start a new run with --out$"),
]


@pytest.mark.parametrize("flags, match", INCOMPATIBLE, ids=[" ".join(f) for f, _ in INCOMPATIBLE])
def test_resume_refuses_an_incompatible_config(finished_run, flags, match):
    before = {f: os.path.getmtime(os.path.join(finished_run, f)) for f in os.listdir(finished_run)}
    fails(TINY + ["--max-steps", "4", "--out", finished_run, "--resume"] + flags, match)
    assert before == {f: os.path.getmtime(os.path.join(finished_run, f)) for f in os.listdir(finished_run)}


# ---------------------------------------------------------------------------------------------
# Reading data: malformed lines name the file and line; users too short for the split are dropped


def test_malformed_grouplens_and_lcrec_files_name_the_file_and_line(tmp_path):
    for ratings, movies, match in [("1::10::5::978300760\n1::20::3::noon\n", "10::A (1995)::Drama\n",
                                    r"ml-1m.zip:ratings.dat:2: expected user::movie::rating::time; download .* again$"),
                                   ("1::10::5::978300760\n", "10::A (1995)::Drama\n11::B (1996)\n",
                                    r"ml-1m.zip:movies.dat:2: expected movie::title::genres; download .* again$")]:
        with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as z:
            z.writestr("ml-1m/ratings.dat", ratings)
            z.writestr("ml-1m/movies.dat", movies)
        with pytest.raises(ValueError, match=match):
            load_dataset(DataConfig(data=str(tmp_path / "ml-1m.zip")))
    (tmp_path / "A.inter.json").write_text(json.dumps({"u0": [1, 2, 3], "u1": 5}))
    with pytest.raises(ValueError, match=r"A.inter.json: user 'u1' has 5, not a list of items; fix the file"):
        load_dataset(DataConfig(data=str(tmp_path / "A.inter.json")))


def test_empty_and_short_users_are_dropped_with_a_count_and_the_run_goes_on(tmp_path, capsys):
    n_items = 12
    seqs = {"empty": [], "one": [0], "two": [1, 2]}
    seqs.update({f"u{u}": [(u + t) % n_items for t in range(4 + u % 5)] for u in range(40)})
    (tmp_path / "S.inter.json").write_text(json.dumps(seqs))
    (tmp_path / "sids.json").write_text(json.dumps({str(i): [i % 3, i // 3] for i in range(n_items)}))
    out = tmp_path / "run"
    main(["--data", str(tmp_path / "S.inter.json"), "--sid", str(tmp_path / "sids.json"), "--device", "cpu",
          "--preset", "tiny", "--batch-size", "8", "--buckets", "1", "--max-steps", "2", "--eval-every", "2",
          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "S: dropped 1 users with no items" in printed
    assert "S: dropped 2 users with fewer than 3 items" in printed
    assert json.load(open(out / "results.json"))["steps"] == 2


def test_no_training_sample_is_a_clear_error(tmp_path):
    (tmp_path / "T.inter.json").write_text(json.dumps({f"u{u}": [u, u + 1, u + 2] for u in range(5)}))
    with pytest.raises(ValueError, match=r"^T: no user has 4 or more items, so there is no training sample"):
        split(load_dataset(DataConfig(data=str(tmp_path / "T.inter.json"))), DataConfig())


# ---------------------------------------------------------------------------------------------
# A failed step stops the run with what happened and which flags help


def poison_loss_from(monkeypatch, first, factor=float("nan")):
    """The training loss is multiplied by `factor` (NaN: turns NaN) from step `first` on."""
    real, calls = step.Step.__call__, []

    def poisoned(self, batch):
        loss, parts = real(self, batch)
        calls.append(1)
        return (loss * factor if len(calls) >= first else loss), parts
    monkeypatch.setattr(step.Step, "__call__", poisoned)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_loss_from(monkeypatch, 5)
    out = tmp_path / "run"
    fails(TINY + ["--max-steps", "20", "--eval-every", "4", "--save-every", "2", "--out", str(out)],
          rf"^error: the training loss is nan at step 6; {re.escape(str(out))}/last.pt \(step 4\) is the last good checkpoint: "
          r"lower --lr, raise --warmup-steps or train in fp32 \(--no-amp\), and --resume$")
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ck["state"]["step"] == 4 and all(p.isfinite().all() for p in ck["model"].values())


def test_a_loss_that_blows_up_but_stays_finite_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    poison_loss_from(monkeypatch, 7, factor=3.0)
    out = tmp_path / "run"
    main(TINY + ["--max-steps", "12", "--eval-every", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning: the training loss")]
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert losses[2] > 2 * min(losses[:2])  # steps 7-9 are the first validation with the blown-up loss
    assert len(warnings) == sum(loss > 2 * min(losses[:i]) for i, loss in enumerate(losses) if i) >= 1
    assert f"is over twice its lowest ({min(losses[:2]):.4f}): the run has likely diverged" in warnings[0]
    assert "Lower --lr or raise --warmup-steps and train again with --overwrite" in warnings[0]
    assert json.load(open(out / "results.json"))["steps"] == 12  # a warning: the run goes on and is tested


def test_overwrite_drops_the_old_checkpoints_and_a_run_without_one_resumes_from_step_0(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    main(TINY + ["--max-steps", "2", "--eval-every", "2", "--out", str(out)])
    poison_loss_from(monkeypatch, 1)
    fails(TINY + ["--max-steps", "4", "--save-every", "1", "--out", str(out), "--overwrite"],
          r"^error: the training loss is nan at step 1; no checkpoint was written yet: lower --lr")
    assert sorted(os.listdir(out)) == ["config.json", "log.jsonl"]  # the old run's checkpoints and results are gone
    monkeypatch.undo()
    main(TINY + ["--max-steps", "2", "--eval-every", "2", "--out", str(out), "--resume"])
    assert "it has no checkpoint yet, so it starts again at step 0" in capsys.readouterr().out
    assert state_of(out / "last.pt")["step"] == 2


def test_out_of_memory_names_batch_length_peak_and_the_flags_that_help(tmp_path, monkeypatch):
    real, calls = step.Step.__call__, []

    def oom_at_step_3(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)
    monkeypatch.setattr(step.Step, "__call__", oom_at_step_3)
    fails(TINY + ["--max-steps", "20", "--out", str(tmp_path / "run")],
          r"^error: CUDA out of memory at step 3: batch 32 x \d+ tokens, peak [\d,]+ MiB allocated; lower "
          r"--batch-size, --max-items \(shorter histories\) or --keep \(SAP drops tokens\)$")


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic, and a killed run resumes exactly


def test_a_checkpoint_interrupted_mid_write_never_replaces_the_good_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    main(TINY + ["--max-steps", "4", "--eval-every", "4", "--out", str(out)])
    last = str(out / "last.pt")
    good = open(last, "rb").read()

    class Killed(BaseException):
        pass

    def dies_mid_write(obj, f):  # what a kill during torch.save leaves: half a file
        f.write(good[:len(good) // 2])
        raise Killed
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(Killed):
        save(last, {"model": "newer"})
    monkeypatch.undo()
    assert open(last, "rb").read() == good and os.path.getsize(last + ".tmp") == len(good) // 2
    main(TINY + ["--max-steps", "6", "--eval-every", "2", "--out", str(out), "--resume"])
    assert state_of(last)["step"] == 6 and not os.path.exists(last + ".tmp")


def train_cmd(out, *flags):
    return [sys.executable, "train.py", *TINY, "--max-steps", "60", "--eval-every", "20", "--save-every", "3",
            "--out", out, *flags]


def checkpoint_step(path):
    return state_of(path)["step"] if os.path.exists(path) else 0


TIMINGS = {"train_s", "samples_s", "tokens_s", "test_eval_s", "train_mem", "eval_mem"}


def test_a_run_killed_at_a_random_step_resumes_to_the_same_result(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    subprocess.run(train_cmd(whole), cwd=ROOT, check=True, capture_output=True)
    target = random.randint(3, 40)
    run = subprocess.Popen(train_cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while run.poll() is None and checkpoint_step(os.path.join(killed, "last.pt")) < target:
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.1))  # then at any moment: mid-step, mid-validation or mid-save
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, f"the run ended before the kill (target step {target})"
    stopped = checkpoint_step(os.path.join(killed, "last.pt"))
    assert target <= stopped < 60 and not os.path.exists(os.path.join(killed, "results.json"))
    resumed = subprocess.run(train_cmd(killed, "--resume"), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {killed} at step {stopped}" in resumed.stdout

    def results(out):
        res = json.load(open(os.path.join(out, "results.json")))
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        return {k: v for k, v in res.items() if k not in TIMINGS}, [{k: v for k, v in r.items() if k not in TIMINGS}
                                                                     for r in log]
    assert results(killed) == results(whole), f"killed at step {stopped}"
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(os.path.join(out, name), weights_only=False)["model"] for out in (whole, killed))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after a kill at step {stopped}"
