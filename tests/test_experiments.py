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
        "mini-4": ("mini/4", "adaln-zero"), "S-8": ("S/8", "adaln-zero")}
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
