"""The experiment runner at a toy budget: every configuration trains, is scored and lands in the table; a second
run reuses what is finished instead of training again."""
import json
import os

from minidit.dev.experiments import configurations, main, parse_args

TOY = ["--steps", "2", "--batch-size", "4", "--per-class", "1", "--sample-steps", "2"]


def test_configurations():
    assert list(configurations(parse_args(["conditioning"]))) == ["adaln-zero", "adaln", "cross-attention",
                                                                  "in-context"]
    assert configurations(parse_args(["scaling", "--variants", "mini/4", "S/8"])) == {
        "mini-4": ("mini/4", "adaln-zero", "ddpm"), "S-8": ("S/8", "adaln-zero", "ddpm")}
    assert configurations(parse_args(["objective"])) == {"ddpm": ("mini/4", "adaln-zero", "ddpm"),
                                                         "flow": ("mini/4", "adaln-zero", "flow")}
    assert parse_args(["objective"]).sample_steps == [10, 25, 50] and parse_args(["scaling"]).sample_steps == [50]
    assert parse_args(["scaling"]).out == os.path.join("results", "scaling")


def test_conditioning_runs_scores_and_resumes(tmp_path):
    out = str(tmp_path / "cond")
    main(["conditioning", "--blocks", "adaln", "in-context", "--out", out] + TOY)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["results"]
    assert list(results) == ["adaln", "in-context"]
    for name, r in results.items():
        assert r["block"] == name and r["steps"] == 2 and r["loss_steps"] == [1, 2] and len(r["loss_values"]) == 2
        assert 0 <= r["accuracy"] <= 1 and r["frechet_distance"] > 0
    table = open(os.path.join(out, "results.md")).read()
    assert "| adaln | mini/4 | adaln |" in table and "| in-context | mini/4 | in-context |" in table
    ckpt = os.path.join(out, "adaln", "checkpoint.npz")
    stamp = os.path.getmtime(ckpt)
    main(["conditioning", "--blocks", "adaln", "--out", out] + TOY)  # finished: scored again, not retrained
    assert os.path.getmtime(ckpt) == stamp
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)["results"]["adaln"]
    assert again["loss_values"] == results["adaln"]["loss_values"]


def test_objective_scores_both_objectives_at_each_step_count(tmp_path):
    out = str(tmp_path / "obj")
    main(["objective", "--out", out, "--steps", "2", "--batch-size", "4", "--per-class", "1",
          "--sample-steps", "2", "3"])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["results"]
    assert list(results) == ["ddpm", "flow"] and results["flow"]["objective"] == "flow"
    assert set(results["ddpm"]["scores"]) == {"2", "3"}
    assert results["ddpm"]["scores"]["2"]["sampler"] == "ddpm" and results["flow"]["scores"]["3"]["sampler"] == "euler"
    table = open(os.path.join(out, "results.md")).read()
    assert "| flow | mini/4 | adaln-zero |" in table and "euler 3" in table and "ddpm 2" in table


def test_samplers_scores_one_checkpoint_with_each_sampler(tmp_path):
    from minidit import train as train_mod

    run = str(tmp_path / "run")
    train_mod.main(["--variant", "mini/4", "--batch-size", "4", "--steps", "2", "--out", run, "--no-final-samples"])
    out = str(tmp_path / "samplers")
    main(["samplers", "--ckpt", run, "--out", out, "--per-class", "1", "--samplers", "ddpm:3", "dpm++2m:2",
          "--cfg-scales", "1.5", "4"])
    with open(os.path.join(out, "results.json")) as f:
        rows = json.load(f)["rows"]
    assert [(r["cfg"], r["sampler"], r["steps"]) for r in rows] == [(1.5, "ddpm", 3), (1.5, "dpm++2m", 2),
                                                                    (4.0, "ddpm", 3), (4.0, "dpm++2m", 2)]
    assert all(0 <= r["accuracy"] <= 1 and r["seconds"] > 0 for r in rows)
    assert "| 4 | dpm++2m | 2 |" in open(os.path.join(out, "results.md")).read()


def test_dynamic_fine_tunes_the_parent_and_times_each_model(tmp_path):
    from minidit import train as train_mod

    parent = str(tmp_path / "parent")
    train_mod.main(["--variant", "mini/4", "--batch-size", "4", "--steps", "2", "--out", parent, "--no-final-samples"])
    out = str(tmp_path / "dynamic")
    argv = ["dynamic", "--ckpt", parent, "--out", out, "--dynamic-runs", "width:0.5", "depth:0.5", "--steps", "2",
            "--per-class", "1", "--samplers", "ddpm:3", "dpm++2m:2", "--cfg-scales", "4"]
    main(argv)
    with open(os.path.join(out, "results.json")) as f:
        rows = json.load(f)["rows"]
    assert [(r["model"], r["sampler"]) for r in rows] == [(m, s) for m in ("parent", "width-0.5", "depth-0.5")
                                                          for s in ("ddpm", "dpm++2m")]
    parent_rows = [r for r in rows if r["model"] == "parent"]
    assert all(r["macs_ratio"] == 1.0 and r["speedup"] == 1.0 for r in parent_rows)
    assert all(0 < r["macs_ratio"] <= 1 and r["seconds"] > 0 for r in rows)
    assert "| width-0.5 | 4 | dpm++2m | 2 |" in open(os.path.join(out, "results.md")).read()
    stamp = os.path.getmtime(os.path.join(out, "width-0.5", "checkpoint.npz"))
    main(argv)  # finished fine-tunes are sampled again, not retrained
    assert os.path.getmtime(os.path.join(out, "width-0.5", "checkpoint.npz")) == stamp
