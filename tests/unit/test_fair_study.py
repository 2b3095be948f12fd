"""The fair study's plan (per-method lr grids that grow at an edge, then seeds) and its run."""
import json

import pytest
import torch

from spectrum_study import fair
from spectrum_study.runner import StudySettings
from tiny import RandomTokens, tiny_model


def _rec(method, lr, seed, best):
    return {"method": method, "lr": lr, "seed": seed, "steps": [0, 10], "heldout": [3.0, best],
            "other": [3.0, 3.1], "trainable_params": 1, "total_params": 2, "train_seconds": 1.0}


def test_grid_grows_at_an_edge_then_seeds_run_at_the_best_rate():
    plan = {"spectrum": (1e-4, 3e-4, 9e-4)}
    todo = fair.next_configs([], plan)
    assert [(c.method, c.lr, c.seed) for c in todo] == [("spectrum", lr, 0) for lr in (1e-4, 3e-4, 9e-4)]
    # best at the upper edge: the grid grows up by STEP
    recs = [_rec("spectrum", 1e-4, 0, 2.9), _rec("spectrum", 3e-4, 0, 2.8), _rec("spectrum", 9e-4, 0, 2.7)]
    assert [c.lr for c in fair.next_configs(recs, plan)] == [pytest.approx(2.7e-3)]
    # the new point is worse: 9e-4 is inside the grid now, so seeds 1 and 2 run there
    recs.append(_rec("spectrum", 2.7e-3, 0, 2.75))
    assert [(c.lr, c.seed) for c in fair.next_configs(recs, plan)] == [(9e-4, 1), (9e-4, 2)]
    recs += [_rec("spectrum", 9e-4, 1, 2.71), _rec("spectrum", 9e-4, 2, 2.69)]
    assert fair.next_configs(recs, plan) == []


def test_grid_stops_growing_after_max_extend():
    plan = {"full": (1e-5, 3e-5)}
    recs = [_rec("full", 1e-5, 0, 2.5), _rec("full", 3e-5, 0, 2.6)]
    for _ in range(fair.MAX_EXTEND):
        (c,) = fair.next_configs(recs, plan)
        assert c.lr < min(r["lr"] for r in recs)
        recs.append(_rec("full", c.lr, 0, 2.5 - 0.01 * len(recs)))
    assert [c.seed for c in fair.next_configs(recs, plan)] == [1, 2]


def test_remaining_counts_unplanned_seeds_and_costs_by_method():
    plan = {"full": (1e-5, 3e-5), "spectrum": (1e-4, 3e-4, 9e-4)}
    full = {**_rec("full", 1e-5, 0, 2.5), "train_cpu_elapsed": [0.0, 900.0], "eval_seconds": 100.0}
    spec = {**_rec("spectrum", 3e-4, 0, 2.6), "train_cpu_elapsed": [0.0, 500.0], "eval_seconds": 100.0}
    n, cpu = fair.remaining([full, spec], plan)
    # full: one grid point and its 2 other seeds (1000 s each); spectrum: 2 points and 2 seeds (600 s each)
    assert n == 3 + 4
    assert cpu == pytest.approx(3 * 1000 + 4 * 600)
    assert fair.remaining([], plan)[0] == 5 + 2 * 2


def test_summary_reaching_full_fine_tunings_best():
    plan = {"full": (1e-5,), "spectrum": (1e-4,)}
    recs = []
    for s in range(3):
        recs.append({**_rec("full", 1e-5, s, 2.70 + 0.01 * s), "steps": [0, 10, 20],
                     "heldout": [3.0, 2.8, 2.70 + 0.01 * s], "other": [3.0, 3.1, 3.2], "train_cpu_elapsed": [0, 5, 10]})
        recs.append({**_rec("spectrum", 1e-4, s, 2.75), "steps": [0, 10, 20], "heldout": [3.0, 2.69, 2.75],
                     "other": [3.0, 2.9, 2.95], "train_cpu_elapsed": [0, 2, 4]})
    rows = {r["method"]: r for r in fair.summarize_fair(recs, {"heldout": 3.0, "other": 3.0}, plan, max_extend=0)}
    assert rows["full"]["heldout_mean"] == pytest.approx(2.71)
    assert rows["full"]["heldout_sd"] == pytest.approx(0.01)
    assert rows["spectrum"]["heldout_mean"] == pytest.approx(2.69)
    assert rows["spectrum"]["forgetting_mean"] == pytest.approx(-0.1)
    assert rows["spectrum"]["reached"] == 3 and rows["spectrum"]["steps_to_target"] == [10, 10, 10]
    assert rows["spectrum"]["seconds_to_target"] == [2, 2, 2]
    assert rows["full"]["reached"] == 2  # seed 2's best (2.72) is above the mean


def _seeded(method, lr, bests, cpu, trainable, total=100):
    return [{**_rec(method, lr, s, b), "steps": [0, 10, 20], "heldout": [3.0, b + 0.05, b], "other": [3.0, 3.1, 3.05],
             "train_cpu_elapsed": [0.0, cpu / 2, cpu], "trainable_params": trainable, "total_params": total,
             "grad_bytes": 4 * trainable, "optimizer_state_bytes_end": 8 * trainable} for s, b in enumerate(bests)]


def test_readings_say_whether_gaps_pass_the_seed_spread():
    plan = {"full": (1e-5,), "spectrum": (1e-4,), "random": (1e-4,), "lora-spectrum": (1e-3,),
            "lora-random": (1e-3,)}
    recs = (_seeded("full", 1e-5, [2.70, 2.71, 2.72], 100.0, 100)
            + _seeded("spectrum", 1e-4, [2.80, 2.81, 2.82], 50.0, 25)
            + _seeded("random", 1e-4, [2.90, 2.91, 2.92], 50.0, 25)
            + _seeded("lora-spectrum", 1e-3, [2.85, 2.86, 2.87], 40.0, 4)
            + _seeded("lora-random", 1e-3, [2.855, 2.86, 2.87], 40.0, 4))
    rows = fair.summarize_fair(recs, {"heldout": 3.0, "other": 3.0}, plan, max_extend=0)
    text = fair.readings(rows)
    snr = next(x for x in text if x.startswith("SNR against random selection"))
    assert "gap -0.1000" in snr and "spectrum lower, beyond both spreads" in snr
    lora = next(x for x in text if x.startswith("SNR-placed against random-placed LoRA"))
    assert "within the spread" in lora
    spec = next(x for x in text if x.startswith("spectrum against full"))
    assert "held-out +0.1000" in spec
    # full reaches 2.81 (spectrum's mean best) at its first evaluation (step 10: 2.75-2.77) in 50 CPU s;
    # spectrum's own best comes at step 20, 50 s
    assert "full fine-tuning 50 s to the same loss (1.00x" in spec
    # weights 400 + grads 100 + state 200 bytes against 400 + 400 + 800
    assert "56 % less than full's" in spec
    lora_full = next(x for x in text if x.startswith("lora-spectrum against full"))
    # LoRA's adapters come on top of the base weights: (100 + 4) * 4 + 16 + 32 against 1600
    assert "71 % less than full's" in lora_full
    one_seed = fair.readings(fair.summarize_fair([recs[0], recs[3], recs[6]], {"heldout": 3.0, "other": 3.0}, plan,
                                                 max_extend=0))
    assert any("not yet seeded" in x for x in one_seed)


def test_run_fair_on_a_tiny_model(tmp_path):
    train = RandomTokens(n=32, length=16, seed=1).data
    evals = {"heldout": RandomTokens(n=8, length=16, seed=2).data,
             "other": torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(3))}
    settings = StudySettings(max_steps=2, batch_size=4, block_size=16, eval_every=1, eval_batch_size=8, warmup=0.0)
    plan = {"full": (5e-3,), "lora-spectrum": (5e-3,)}
    rep = fair.run_fair(lambda: tiny_model("llama", seed=0), train, evals, settings, str(tmp_path), plan,
                        seeds=(0, 1), max_extend=0)
    assert sorted(rep["trained"]) == ["full-s1_lr0.005", "full_lr0.005", "lora-spectrum-s1_lr0.005",
                                      "lora-spectrum_lr0.005"]
    rows = {r["method"]: r for r in rep["rows"]}
    assert rows["full"]["seeds"] == [0, 1]
    full0 = json.loads((tmp_path / "runs" / "full_lr0.005.json").read_text())
    full1 = json.loads((tmp_path / "runs" / "full-s1_lr0.005.json").read_text())
    assert full0["train_loss"] != full1["train_loss"]  # the seed changed the data order
    lora = json.loads((tmp_path / "runs" / "lora-spectrum_lr0.005.json").read_text())
    assert 0 < lora["trainable_params"] < full0["trainable_params"]
    assert lora["optimizer_state_bytes_end"] == 2 * lora["grad_bytes"]  # AdamW: two fp32 moments per parameter
    assert len(lora["train_cpu_elapsed"]) == len(lora["steps"])
    assert 0 < lora["train_cpu_elapsed"][1] < lora["train_cpu_elapsed"][2] <= lora["train_seconds"] * 1.5
    assert (tmp_path / "study.png").stat().st_size > 1000
    table = (tmp_path / "table.md").read_text()
    assert "| lora-spectrum |" in table and "| full |" in table
    # a second call finds nothing left
    again = fair.run_fair(lambda: tiny_model("llama", seed=0), train, evals, settings, str(tmp_path), plan,
                          seeds=(0, 1), max_extend=0)
    assert again["trained"] == []


def test_stop_file_ends_the_run_before_the_next_configuration(tmp_path):
    train = RandomTokens(n=16, length=16, seed=1).data
    evals = {"heldout": RandomTokens(n=4, length=16, seed=2).data, "other": RandomTokens(n=4, length=16, seed=3).data}
    settings = StudySettings(max_steps=1, batch_size=4, block_size=16, eval_every=1, eval_batch_size=4, warmup=0.0)
    plan = {"full": (5e-3,), "spectrum": (5e-3,)}
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / fair.STOP_FILE).touch()
    rep = fair.run_fair(lambda: tiny_model("llama", seed=0), train, evals, settings, str(tmp_path), plan,
                        seeds=(0,), max_extend=0)
    assert rep["trained"] == []
    assert json.loads((tmp_path / "summary.json").read_text())["left"] == ["full_lr0.005", "spectrum_lr0.005"]
    (tmp_path / "work" / fair.STOP_FILE).unlink()
    rep = fair.run_fair(lambda: tiny_model("llama", seed=0), train, evals, settings, str(tmp_path), plan,
                        seeds=(0,), max_extend=0, max_configs=1)
    assert rep["trained"] == ["full_lr0.005"]


def test_frontier_keeps_only_runs_no_other_run_beats_on_both_counts():
    from spectrum_study import fair_report

    base = {"heldout": 3.0, "other": 3.0}
    recs = [{**_rec(m, lr, s, h), "other": [3.0, 3.0 + f]} for m, lr, s, h, f in [
        ("full", 2e-5, 0, 2.83, -0.02), ("full", 5e-5, 0, 2.79, 0.03),
        ("spectrum", 1.5e-4, 0, 2.82, 0.00), ("spectrum", 1.5e-4, 1, 2.84, 0.02),  # mean 2.83, +0.01
        ("random", 4.5e-4, 0, 2.80, 0.10),  # beaten on both by full at 5e-5
        ("lora", 5e-4, 0, 2.79, 0.13)]]     # ties full on held-out, forgets more: beaten
    points = fair_report.trade_off(recs, base)
    spec = next(p for p in points if p["method"] == "spectrum")
    assert spec["seeds"] == 2 and spec["heldout"] == pytest.approx(2.83) and spec["forgetting"] == pytest.approx(0.01)
    front = fair_report.frontier(points)
    # spectrum ties full at 2e-5 on held-out and forgets more
    assert [(p["method"], p["lr"]) for p in front] == [("full", 2e-5), ("full", 5e-5)]
    text = fair_report.frontier_reading(points)
    assert "full at 2e-05 (2.8300, -0.0200); full at 5e-05 (2.7900, +0.0300)" in text
    assert "Every rate of lora, random, spectrum is beaten" in text
    # a spectrum run that forgets less than anything joins the front, first
    points.append({"method": "spectrum", "lr": 5e-5, "seeds": 1, "heldout": 2.9, "forgetting": -0.04})
    assert [p["method"] for p in fair_report.frontier(points)][0] == "spectrum"


def _write_summary(folder, methods):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"methods": methods}))


def test_best_rates_read_a_finished_study_and_refuse_an_unsettled_grid(tmp_path):
    _write_summary(tmp_path, [{"method": "full", "best_lr": 5e-5, "settled": True},
                              {"method": "spectrum", "best_lr": 1.5e-4, "settled": False}])
    assert fair.best_rates(str(tmp_path), ["full"]) == {"full": 5e-5}
    with pytest.raises(ValueError, match="spectrum has no settled best rate"):
        fair.best_rates(str(tmp_path), ["full", "spectrum"])
    with pytest.raises(ValueError, match="lora has no settled best rate"):
        fair.best_rates(str(tmp_path), ["lora"])
    with pytest.raises(ValueError, match="does not exist"):
        fair.best_rates(str(tmp_path / "nowhere"), ["full"])


def test_at_best_cli_refuses_bad_folders_with_one_line(tmp_path, capsys):
    assert fair.main(["--at-best", str(tmp_path / "nowhere"), "--out", str(tmp_path / "long")]) == 2
    assert "summary.json does not exist" in capsys.readouterr().err
    _write_summary(tmp_path / "study", [{"method": m, "best_lr": 1e-4, "settled": True} for m in fair.LONG])
    assert fair.main(["--at-best", str(tmp_path / "study"), "--out", str(tmp_path / "study")]) == 2
    assert "needs its own --out folder" in capsys.readouterr().err
    assert fair.main(["--at-best", str(tmp_path / "study"), "--out", str(tmp_path / "long"), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "holds no runs yet" in err and "Traceback" not in err


def test_one_seed_at_the_best_rate_leaves_nothing_to_run(tmp_path):
    # the long-horizon run: one point per method, seed 0 only; the reports must not plan seeds 1 and 2
    train = RandomTokens(n=16, length=16, seed=1).data
    evals = {"heldout": RandomTokens(n=4, length=16, seed=2).data, "other": RandomTokens(n=4, length=16, seed=3).data}
    settings = StudySettings(max_steps=2, batch_size=4, block_size=16, eval_every=1, eval_batch_size=4, warmup=0.0)
    _write_summary(tmp_path / "study", [{"method": "full", "best_lr": 5e-3, "settled": True},
                                        {"method": "spectrum-rotate-park", "best_lr": 1e-2, "settled": True}])
    plan = {m: (lr,) for m, lr in fair.best_rates(str(tmp_path / "study"), ["spectrum-rotate-park", "full"]).items()}
    rep = fair.run_fair(lambda: tiny_model("llama", seed=0), train, evals, settings, str(tmp_path / "long"), plan,
                        seeds=(0,), max_extend=0)
    assert rep["trained"] == ["spectrum-rotate-park_lr0.01", "full_lr0.005"]
    summary = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert summary["left"] == [] and summary["left_at_least"] == 0
    assert "Still to run" not in rep["table"]
    assert [r["method"] for r in rep["rows"]] == ["spectrum-rotate-park", "full"]


def test_far_points_are_the_rates_that_diverged():
    from spectrum_study import fair_report

    points = [{"method": "lora", "lr": 5e-4, "heldout": 2.80, "forgetting": 0.1},
              {"method": "lora", "lr": 4.5e-3, "heldout": 3.05, "forgetting": 0.8},
              {"method": "full", "lr": 5e-5, "heldout": 2.94, "forgetting": 0.0}]
    assert [p["lr"] for p in fair_report.far_points(points)] == [4.5e-3]
    assert fair_report.far_points(points, reach=0.1) == points[1:]
    assert fair_report.far_points([]) == []
