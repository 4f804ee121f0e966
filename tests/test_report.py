"""report.py: figures from an evaluation's metrics.json and its per-group table, the tables' cells, and the answers
changed. (A whole report, written from the runs of a grid, is tested through experiments.py in
test_experiments.py.)"""

import argparse
import json

import numpy as np
import pytest

import grids
import report
from cli import UserError


def test_per_group_columns_come_from_the_evaluations_group_table():
    result = {"accuracy": 0.5, "ci": {},
              "groups": {"famous": {"mean_stability": 0.9}, "unwritten": {"mean_stability": 0.4}}}
    assert report.figure_of(result, "famous/mean_stability") == 0.9
    assert np.isnan(report.figure_of(result, "rare/mean_stability"))
    table = grids.Table("t", ("accuracy", "famous/mean_stability", "unwritten/mean_stability",
                                    "rare/mean_stability"), (("untrained", "untrained", {}),))
    lines = report.table_markdown(table, argparse.Namespace(seeds=1), {("untrained", 0): result})
    assert lines[0] == "| condition | accuracy: ours | stability, famous: ours | stability, unwritten: ours |"
    assert lines[2] == "| untrained | 50.0% | 0.90 | 0.40 |"


def test_changed_share_counts_answers_that_are_not_the_same_answer():
    before = [{"question": q, "answer": a} for q, a in (("a?", "Paris"), ("b?", "Lyon"), ("c?", None), ("d?", "x"))]
    after = [{"question": q, "answer": a} for q, a in (("a?", "paris."), ("b?", "Nice"), ("c?", None), ("d?", "y"))]
    assert report.changed_share(after, before) == 0.5
    with pytest.raises(UserError, match="different questions"):
        report.changed_share(after[::-1], before)


def test_a_within_group_claim_and_the_instance_figure_are_computed_within_each_fame_class(tmp_path):
    """The instance grid's claims compare AUROCs within fame, recomputed from each run's responses on every
    bootstrap resample: a confidence that ranks within each class against one that states the class's rate."""
    rng = np.random.default_rng(0)
    fame = ["famous"] * 30 + ["rare"] * 30
    correct = [bool(c) for c in rng.random(60) < np.where(np.arange(60) < 30, 0.8, 0.3)]
    by_class = [0.8 if f == "famous" else 0.3 for f in fame]
    ranked = [rate + (0.1 if y else -0.1) for rate, y in zip(by_class, correct)]
    args = argparse.Namespace(runs=str(tmp_path), seeds=1, out=str(tmp_path), grid="instance")
    for name, confidence in (("C", by_class), ("bound", ranked)):
        folder = tmp_path / f"{name}-seed0" / "eval-fame"
        folder.mkdir(parents=True)
        (folder / "responses-final.jsonl").write_text("".join(json.dumps(
            {"question": f"q{i}", "fame": f, "confidence": c, "correct": y, "abstained": False, "alternative": False,
             "stability": None, "probe_answer": float(y)}) + "\n" for i, (f, c, y) in
            enumerate(zip(fame, confidence, correct))))
    claim = grids.Claim("bound ranks better", "auroc_within_group", "bound", "C", questions="eval-fame",
                        group_by="fame")
    value, (low, high), _ = report.claim_test(claim, args, resamples=200)
    assert value == pytest.approx(0.5) and low > 0.3   # 1.0 within each class against a coin
    overall = grids.Claim("overall", "auroc", "bound", "C", questions="eval-fame")
    assert report.claim_test(overall, args, resamples=20)[0] < value   # the class's rate ranks across classes
    assert report.name_of("auroc_within_group", "fame") == "AUROC within fame"
    results = {(name, 0): {"auroc_within_group": v, "probe_answer_auroc_within_group": 1.0, "ci": {}}
               for name, v in (("C", 0.5), ("bound", 1.0))}
    table = grids.Table("t", (), (("C", "C", {}), ("bound", "bound", {})), group="fame")
    report.instance_plot(args, table, results, "within-fame.png")
    assert (tmp_path / "within-fame.png").read_bytes().startswith(b"\x89PNG")
