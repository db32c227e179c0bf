"""The training loop on synthetic data (CPU): a run folder, resuming, SAP and MAP switched on, clear errors."""
import json
import os

import pytest
import torch

from evaluate import main as evaluate_main
from step import Step
from train import main

TINY = ["--data", "synthetic", "--synthetic-users", "150", "--synthetic-items", "60", "--device", "cpu",
        "--preset", "tiny", "--codebook-size", "4", "--batch-size", "32", "--warmup-steps", "2",
        "--schedule", "constant", "--buckets", "2", "--eval-batch", "256"]


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_a_few_steps_write_a_complete_run_folder(tmp_path, capsys):
    out = str(tmp_path / "run")
    main(TINY + ["--max-steps", "6", "--eval-every", "3", "--out", out])
    assert sorted(os.listdir(out)) == ["best.pt", "config.json", "last.pt", "log.jsonl", "results.json"]
    res = json.load(open(os.path.join(out, "results.json")))
    assert {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "samples_s", "popularity"} <= set(res)
    assert [r["step"] for r in log(out)] == [3, 6]
    # evaluate.py re-evaluates the saved run and finds its test metrics again
    evaluate_main([out, "--device", "cpu", "--data-dir", str(tmp_path)])
    test = capsys.readouterr().out.splitlines()[-1]
    assert test.startswith(f"test: recall@5 {res['recall@5']:.4f}") and "users/s" in test


def test_resume_continues_at_the_same_step_with_the_same_next_loss(tmp_path):
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    main(TINY + ["--max-steps", "9", "--eval-every", "3", "--out", whole])
    main(TINY + ["--max-steps", "6", "--eval-every", "3", "--out", part])
    main(TINY + ["--max-steps", "9", "--eval-every", "3", "--out", part, "--resume"])
    a, b = log(whole), log(part)
    assert [r["step"] for r in b] == [3, 6, 9]
    assert a[-1]["loss"] == b[-1]["loss"] and a[-1]["valid"] == b[-1]["valid"]


def test_sap_and_map_train_and_log_each_depth(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "stamp")
    main(TINY + ["--max-steps", "4", "--eval-every", "4", "--keep", "0.5", "--prune-layer", "1",
                 "--map-steps", "2", "--out", out])
    rec = log(out)[-1]
    assert {"loss", "loss_main", "loss_map1", "acc_map1", "loss_map2", "acc_map2"} <= set(rec)
    # keep is a fraction of the longest history's tokens (30 items of their codes and a separator)
    model = json.load(open(os.path.join(out, "config.json")))["model"]
    assert model["sap_len"] == 30 * (len(model["code_sizes"]) + 1)
    assert f"keep at most {model['sap_len'] // 2} of the encoder tokens" in capsys.readouterr().out
    # evaluate.py measures the same run both ways: unpruned (the default) and pruned (--sap-eval)
    import evaluate
    res, pruned, real = json.load(open(os.path.join(out, "results.json"))), [], evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda model, *a: pruned.append(model.cfg.sap_eval) or real(model, *a))
    capsys.readouterr()
    for flags in ([], ["--sap-eval"]):
        evaluate_main([out, "--device", "cpu", "--data-dir", str(tmp_path), *flags])
        test = capsys.readouterr().out.splitlines()[-1]
        assert "users/s" in test and (flags or test.startswith(f"test: recall@5 {res['recall@5']:.4f}"))
    assert pruned == [False, False, True, True]  # valid and test, without then with pruning


def test_sap_eval_refuses_a_run_trained_without_sap(tmp_path):
    out = str(tmp_path / "run")
    main(TINY + ["--max-steps", "2", "--eval-every", "2", "--out", out])
    with pytest.raises(SystemExit, match="trained with --keep 1"):
        evaluate_main([out, "--device", "cpu", "--data-dir", str(tmp_path), "--sap-eval"])


def test_grids_variants_train_and_evaluate_with_the_runs_beam_scoring(tmp_path, capsys):
    """--level-softmax, --beam-norm valid and GRID's feed-forward: evaluate.py re-scores the run as it was
    trained to be scored, and refuses the whole-vocabulary scoring that such a run never learned."""
    out = str(tmp_path / "grid")
    main(TINY + ["--max-steps", "3", "--eval-every", "3", "--level-softmax", "--beam-norm", "valid", "--ff-layers", "2",
                 "--ff-bias", "--out", out])
    res = json.load(open(os.path.join(out, "results.json")))
    capsys.readouterr()
    evaluate_main([out, "--device", "cpu", "--data-dir", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"test: recall@5 {res['recall@5']:.4f}")
    with pytest.raises(SystemExit, match="trained with --level-softmax"):
        evaluate_main([out, "--device", "cpu", "--data-dir", str(tmp_path), "--beam-norm", "vocab"])


def test_an_existing_run_is_never_overwritten_by_accident(tmp_path, capsys):
    out = str(tmp_path / "run")
    main(TINY + ["--max-steps", "2", "--eval-every", "2", "--out", out])
    with pytest.raises(SystemExit, match="already holds a run: pass --resume to continue it, --overwrite"):
        main(TINY + ["--max-steps", "2", "--out", out])


def test_the_paper_t5_recipe_is_grids_and_flags_override_it():
    from train import parse_args
    t5, qwen = parse_args(["--arch", "t5"])["train"], parse_args(["--arch", "qwen"])["train"]
    assert (t5.batch_size, t5.schedule, t5.warmup_steps, t5.epochs, t5.lr) == (2048, "constant", 200, 150, 1e-3)
    assert (qwen.batch_size, qwen.schedule) == (256, "cosine")  # the recipe is per architecture
    mine = parse_args(["--arch", "t5", "--batch-size", "256", "--schedule", "cosine", "--epochs", "10"])["train"]
    assert (mine.batch_size, mine.schedule, mine.epochs, mine.warmup_steps) == (256, "cosine", 10, 200)
    tiny = parse_args(["--arch", "t5", "--preset", "tiny"])
    assert tiny["train"].batch_size == 256 and tiny["model"].d_model == 64
    inits = [parse_args(a)["model"].init for a in (["--arch", "t5"], ["--arch", "t5", "--init", "hf"], ["--arch", "qwen"])]
    assert inits == ["torch", "hf", "hf"]  # GRID resets its T5 to PyTorch's defaults


def test_validation_is_once_per_epoch_but_at_most_about_20_times_a_run():
    from train import default_eval_every
    assert default_eval_every(62, 62 * 20) == 62  # 20 epochs: every epoch
    assert default_eval_every(62, 62 * 150) == 62 * 8  # 150 epochs: every 8th, 19 validations
    assert default_eval_every(10, 25) == 10  # a short run still validates each epoch


class Toy(torch.nn.Module):
    """loss = sum(w * x): its gradient is x, whatever w is."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))

    def loss(self, batch):
        return (self.w * batch["x"]).sum(), {}


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_adds_weight_decay_to_the_gradient_and_adamw_decays_apart_from_it(optimizer):
    """GRID's Adam puts wd * w into the gradient, where it can flip the sign of Adam's first step
    (lr * g / |g|); AdamW steps on the loss's gradient alone and shrinks w by lr * wd besides."""
    lr, wd, x = 0.1, 0.5, torch.tensor([[0.1, 0.1], [-0.1, -0.1]])
    toy = Toy()
    w = toy.w.detach().clone()
    step = Step(toy, lr=lr, weight_decay=wd, clip=0.0, device=torch.device("cpu"), optimizer=optimizer)
    step({"x": x})
    if optimizer == "adam":
        expected = w - lr * torch.sign(x + wd * w)  # the signs at [0][1] and [1][1] differ from x's
    else:
        expected = w * (1 - lr * wd) - lr * torch.sign(x)
    torch.testing.assert_close(toy.w.detach(), expected, atol=1e-6, rtol=0)


def test_clip_zero_leaves_the_gradient_alone():
    x = torch.full((2, 2), 10.0)  # gradient norm 20
    moments = []
    for clip in (0.0, 1.0):
        toy = Toy()
        step = Step(toy, lr=1e-3, weight_decay=0.0, clip=clip, device=torch.device("cpu"))
        step({"x": x})
        moments.append(step.opt.state[toy.w]["exp_avg"] / 0.1)  # Adam's first moment: (1 - beta1) * gradient
    torch.testing.assert_close(moments[0], x)
    torch.testing.assert_close(moments[1], x / 20, rtol=1e-4, atol=0)
