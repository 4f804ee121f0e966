"""grids.py: every grid names conditions that exist, and a condition's flags are ones its script takes."""

import eval as evaluation
import grids
import train


def test_every_grid_names_conditions_that_exist_and_the_paraphrase_grid_asks_alike():
    assert all(name in grids.CONDITIONS for tables in grids.GRIDS.values() for t in tables
               for name, _, _ in t.rows)
    rows = {name for t in grids.GRIDS["paraphrase"] for name, _, _ in t.rows}
    assert {grids.CONDITIONS[name].eval for name in rows} == {grids.ASKED}




def test_every_condition_is_a_command_line_its_scripts_take_and_every_claim_compares_its_grids_runs(tmp_path):
    for name, condition in grids.CONDITIONS.items():
        if condition.train:
            args = train.parse_args(["--model", "tiny", "--dataset", "tiny", *condition.train,
                                     "--out", str(tmp_path / name)])
            assert args.data in (1600, 5000), name   # the paper's two sizes of labeled data
        evaluation.parse_args(["--model", "tiny", "--dataset", "tiny", *condition.eval, "--out", str(tmp_path / "e")])
    for grid, claims in grids.CLAIMS.items():
        conditions = grids.grid_conditions(grids.GRIDS[grid])
        for claim in claims:
            assert {claim.a, claim.b} <= set(conditions), (grid, claim.claim)
    for label, points in grids.DOSES.items():
        assert all(train.parse_args(["--model", "tiny", *grids.CONDITIONS[name].train, "--out", str(tmp_path / "d")])
                   .epochs == epochs for name, epochs in points), label
