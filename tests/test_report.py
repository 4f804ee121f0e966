"""report.py: figures from an evaluation's metrics.json and its per-group table, the tables' cells, and the answers
changed. (A whole report, written from the runs of a grid, is tested through experiments.py in
test_experiments.py.)"""

import argparse

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
