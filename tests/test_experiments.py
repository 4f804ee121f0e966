"""experiments.py on a tiny model: a two-condition grid runs, its report holds every table, a rerun skips
finished work and an interrupted training run is resumed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import eval as evaluation
import experiments
import grids
import report
import train

TINY_RUN = ("--data", "8", "--epochs", "1", "--batch", "4", "--rollouts", "2", "--lr", "5e-3")


def define_grid(monkeypatch):
    """A grid "two": the untrained model, and a condition T that trains in seconds."""
    monkeypatch.setitem(grids.CONDITIONS, "T", grids.Condition(train=TINY_RUN))
    monkeypatch.setitem(grids.GRIDS, "two", [
        grids.Table("Sanity: untrained", ("r_stability_correct", "r_confidence_correct"),
                    (("untrained", "the untrained model", {"r_stability_correct": 0.48}),)),
        grids.Table("Trained: T", ("accuracy", "calibration_gap", "gap_reduction"),
                    (("untrained", "untrained", {}), ("T", "run T", {"accuracy": 0.436}))),
    ])


@pytest.fixture
def grid(monkeypatch):
    define_grid(monkeypatch)


def argv(tmp_path, model, questions, *extra):
    return ["two", "--model", model, "--dataset", questions, "--n", "6", "--out", str(tmp_path / "grid"),
            "--train-args=--max-new-tokens 14", "--eval-args=--max-new-tokens 10 --bootstrap 20", *extra]


@pytest.fixture(scope="module")
def two_seeds(formatted, tmp_path_factory):
    """The grid "two" run once with 2 seeds, its runs trained and evaluated, for the tests that build on them (a
    copy each, copy_runs). T's seed 1 was interrupted after its first step before the grid ran: the grid
    continues it."""
    model, questions = formatted
    tmp_path = tmp_path_factory.mktemp("two-seeds")
    out = tmp_path / "grid"
    with pytest.MonkeyPatch.context() as monkeypatch:
        define_grid(monkeypatch)
        train.main(["--model", model, "--dataset", questions, *TINY_RUN, "--seed", "1", "--out",
                    str(out / "T-seed1"), "--ckpt", str(out / "T-seed1" / "final.safetensors"), "--max-new-tokens",
                    "14", "--max-steps", "1"])
        experiments.main(argv(tmp_path, model, questions, "--seeds", "2"))
    return out


def copy_runs(source, folder):
    """A copy of a grid's runs in `folder`, its recorded commands (commands.json) naming their new place."""
    shutil.copytree(source, folder)
    for path in folder.glob("*/commands.json"):
        path.write_text(path.read_text().replace(str(source), str(folder)))
    return folder


def test_grid_runs_reports_every_table_and_skips_finished_work(tmp_path, formatted, grid, two_seeds, monkeypatch):
    model, questions = formatted
    out = copy_runs(two_seeds, tmp_path / "grid")

    for seed in (0, 1):
        log = [json.loads(line) for line in open(out / f"T-seed{seed}" / "metrics.jsonl")]
        assert [r["step"] for r in log] == [0, 1]
        assert json.load(open(out / f"T-seed{seed}" / "config.json"))["seed"] == seed
        assert (out / f"T-seed{seed}" / "eval" / "metrics.json").exists()
    assert not (out / "untrained-seed1").exists()   # the untrained model is evaluated once

    markdown = (out / "report.md").read_text()
    for text in ("## Sanity: untrained", "## Trained: T", "| the untrained model | 0.48 |", "| run T | 43.6% |",
                 "r(stability, correct): paper", "gap reduction from untrained: ours", "over 2 seeds",
                 "experiments.py two --model"):
        assert text in markdown, text
    for png in ("training-trained.png", "reliability-trained.png", "reliability-sanity.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in markdown
    t = [json.load(open(out / f"T-seed{s}" / "eval" / "metrics.json"))["final"] for s in (0, 1)]
    accuracy = [r["accuracy"] for r in t]
    mean, sd = sum(accuracy) / 2, abs(accuracy[0] - accuracy[1]) / 2 ** 0.5
    assert f"| run T | 43.6% | {100 * mean:.1f}% ± {100 * sd:.1f}% |" in markdown

    # a rerun trains and evaluates nothing, and writes the same report
    def refuse(*args, **kwargs):
        raise AssertionError("finished work was redone")
    monkeypatch.setattr(experiments, "launch", refuse)
    os.remove(out / "report.md")
    experiments.main(argv(tmp_path, model, questions, "--seeds", "2"))
    assert (out / "report.md").read_text() == markdown.replace(str(two_seeds), str(out))   # its command names --out


def test_claims_are_paired_differences_with_intervals_and_shared_runs_are_trained_once(tmp_path, formatted, grid,
                                                                                        two_seeds, monkeypatch):
    model, questions = formatted
    monkeypatch.setitem(grids.CLAIMS, "two", [
        grids.Claim("T is more accurate than the untrained model", "accuracy", "T", "untrained"),
        grids.Claim("stability beats stated confidence", "r_stability_correct", "untrained", "untrained",
                          "r_confidence_correct"),
        grids.Claim("T's gap is smaller", "calibration_gap", "untrained", "T", absolute=True),
        grids.Claim("T oscillates", "oscillation", "T", "untrained"),
    ])
    runs = copy_runs(two_seeds, tmp_path / "shared")
    experiments.main(argv(tmp_path, model, questions, "--seeds", "2", "--runs", str(runs)))
    markdown = (tmp_path / "grid" / "report.md").read_text()
    assert "## The paper's claims, tested" in markdown and (runs / "T-seed1" / "final.safetensors").exists()
    row = next(line for line in markdown.splitlines() if line.startswith("| T is more accurate"))
    t = [json.load(open(runs / f"T-seed{s}" / "eval" / "metrics.json"))["final"]["accuracy"] for s in (0, 1)]
    base = json.load(open(runs / "untrained-seed0" / "eval" / "metrics.json"))["base"]["accuracy"]
    assert f"| {sum(t) / 2 - base:+.3f} |" in row
    assert any(v in row for v in ("| holds |", "| not shown |", "| reversed |"))
    untrained = json.load(open(runs / "untrained-seed0" / "eval" / "metrics.json"))["base"]
    difference = untrained["r_stability_correct"] - untrained["r_confidence_correct"]
    row = next(line for line in markdown.splitlines() if line.startswith("| stability beats"))
    assert (f"| {difference:+.3f} |" in row) or "not testable" in row
    gaps = [json.load(open(runs / f"T-seed{s}" / "eval" / "metrics.json"))["final"]["calibration_gap"] for s in (0, 1)]
    row = next(line for line in markdown.splitlines() if line.startswith("| T's gap"))
    assert f"| {abs(untrained['calibration_gap']) - abs(sum(gaps) / 2):+.3f} |" in row, row
    row = next(line for line in markdown.splitlines() if line.startswith("| T oscillates"))
    assert "needs --seeds 3" in row and "not testable here" in row   # an interval over 2 seeds is no interval
    # a second grid on the same runs trains nothing; a claim `within` a group takes only that group's questions
    rows = [json.loads(line) for line in open(runs / "untrained-seed0" / "eval" / "responses-base.jsonl")]
    value = max((True, False), key=lambda v: sum(r["correct"] == v for r in rows))
    group = evaluation.figures([r for r in rows if r["correct"] == value])
    monkeypatch.setitem(grids.CLAIMS, "two", [grids.Claim(
        "within", "accuracy", "untrained", "untrained", "mean_confidence", within=("correct", value))])
    monkeypatch.setattr(experiments, "launch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    experiments.main(argv(tmp_path, model, questions, "--seeds", "2", "--runs", str(runs), "--out",
                          str(tmp_path / "other")))
    row = next(line for line in (tmp_path / "other" / "report.md").read_text().splitlines()
               if line.startswith("| within |"))
    assert f"| {group['accuracy'] - group['mean_confidence']:+.3f} |" in row, row
    assert f"(questions with correct = {value})" in row
    monkeypatch.setitem(grids.CLAIMS, "two", [grids.Claim(
        "within", "accuracy", "untrained", "untrained", "mean_confidence", within=("correct", "maybe"))])
    with pytest.raises(experiments.UserError, match="no evaluation question has it"):
        experiments.main(argv(tmp_path, model, questions, "--seeds", "2", "--runs", str(runs), "--out",
                              str(tmp_path / "other")))
    # a grid with other flags is refused the shared folders, not handed their results
    with pytest.raises(experiments.UserError, match="holds a run with other flags"):
        experiments.main(argv(tmp_path, model, questions, "--seeds", "2", "--runs", str(runs), "--n", "5"))


def test_one_seed_shows_bootstrap_intervals_and_bad_seeds_are_refused(tmp_path, formatted, grid, two_seeds, capsys):
    model, questions = formatted
    copy_runs(two_seeds, tmp_path / "grid")
    experiments.main(argv(tmp_path, model, questions))
    markdown = (tmp_path / "grid" / "report.md").read_text()
    assert "95% bootstrap intervals" in markdown and " [" in markdown.split("| run T |")[1].split("\n")[0]
    with pytest.raises(SystemExit):
        experiments.parse_args(["paper", "--seeds", "0"])
    assert "--seeds: must be at least 1, got 0" in capsys.readouterr().err


def test_devices_run_conditions_at_once_each_in_its_folder_and_the_launcher_starts_them(tmp_path, formatted, grid,
                                                                                        monkeypatch):
    """Two CPU slots: the untrained evaluation and run T overlap in time; run T goes through torchrun with 2
    processes (--launcher); each writes its own folder and log."""
    model, questions = formatted
    spans, launch = {}, experiments.launch

    def timed(script, argv, args, device, folder):
        start = time.time()
        launch(script, argv, args, device, folder)
        spans[folder, script] = (start, time.time())
    monkeypatch.setattr(experiments, "launch", timed)
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2"
    experiments.main(argv(tmp_path, model, questions, "--devices", "cpu,cpu", "--launcher", torchrun))
    out = tmp_path / "grid"
    (a0, a1), (b0, b1) = spans[str(out / "untrained-seed0"), "eval.py"], spans[str(out / "T-seed0"), "train.py"]
    assert a0 < b1 and b0 < a1   # at the same time
    log = [json.loads(line) for line in open(out / "T-seed0" / "metrics.jsonl")]
    assert [r["world_size"] for r in log] == [2, 2]
    assert (out / "T-seed0" / "train.log").exists() and (out / "untrained-seed0" / "eval.log").exists()
    assert (out / "report.md").exists()
    with pytest.raises(SystemExit):
        experiments.parse_args(["paper", "--devices", "gpu0"])
    assert experiments.device_slots("cuda:0,cuda:1") == ["0", "1"] and experiments.device_slots("3") == ["0", "1", "2"]
    assert experiments.device_slots("0+1,2+3") == ["0,1", "2,3"]


def test_bad_flags_of_any_run_are_refused_before_the_first_trains(tmp_path, formatted, grid, capsys, monkeypatch):
    model, questions = formatted
    launched = []
    monkeypatch.setattr(experiments, "launch", lambda *a: launched.append(a))
    for extra, message in ((["--n", "0"], "--n: must be at least 1, got 0"),
                           (["--devices", "0"], "a count of devices must be at least 1 (for GPU 0 alone: cuda:0)"),
                           (["--train-args=--lr '2e-4"], "--train-args: No closing quotation")):
        with pytest.raises(SystemExit):
            experiments.main(argv(tmp_path, model, questions, *extra))
        assert message in capsys.readouterr().err
    with pytest.raises(experiments.UserError, match=r"train.py would refuse the flags of T \(seed 0\): argument "
                                                    "--clip: must be a finite number, got nan"):
        experiments.main(argv(tmp_path, model, questions, "--train-args=--clip nan"))
    for extra, message in ((["--train-args=--seed 5"], r"--train-args sets what the grid sets for each run \(--seed\)"),
                           (["--train-args=--see 5 --lr 1"], r"\(--lr, --seed\)"),   # T's own --lr; abbreviated
                           (["--eval-args=--out x --json y"], r"--eval-args sets .* \(--json, --out\)")):
        with pytest.raises(SystemExit):
            experiments.main(argv(tmp_path, model, questions, *extra))
        assert re.search(message, capsys.readouterr().err), message
    with pytest.raises(experiments.UserError, match=r"eval.py would refuse the flags of untrained \(seed 0\): "
                                                    "argument --bootstrap: must be 0 or more"):
        experiments.main(argv(tmp_path, model, questions, "--eval-args=--bootstrap -5"))
    with pytest.raises(experiments.UserError, match=r"train.py would refuse the flags of T \(seed 0\): --help is not "
                                                    "a flag for a run"):
        experiments.main(argv(tmp_path, model, questions, "--train-args=--help"))
    for launcher, message in (("torchrun 'x", "--launcher: No closing quotation"),
                              ("no-such-launcher -x", "--launcher: no program 'no-such-launcher' here")):
        with pytest.raises(SystemExit):
            experiments.main(argv(tmp_path, model, questions, "--launcher", launcher))
        assert message in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    with pytest.raises(experiments.UserError, match="--out .*a-file is a file; it must be a folder"):
        experiments.main(argv(tmp_path, model, questions, "--out", str(tmp_path / "a-file")))
    assert not launched and sorted(os.listdir(tmp_path)) == ["a-file"]


def test_a_grid_on_training_questions_evaluates_each_run_on_its_own_pool(tmp_path, formatted, grid, two_seeds,
                                                                          monkeypatch):
    """The stress grid's machinery: every trained run also answers the questions it trained on (train.py's pool
    for its seed), the untrained model each seed's; a claim on them pairs the runs of a seed; the log's
    per-question pushes map back to the pool."""
    model, questions = formatted
    monkeypatch.setattr(experiments, "ON_TRAINING_QUESTIONS", {"two"})
    monkeypatch.setitem(grids.CLAIMS, "two", [
        grids.Claim("T beats untrained on its questions", "accuracy", "T", "T", "mean_confidence",
                          questions="eval-train")])
    copy_runs(two_seeds, tmp_path / "grid")   # trained and evaluated held out: what is added is the pools' evaluations
    experiments.main(argv(tmp_path, model, questions, "--seeds", "2"))
    out = tmp_path / "grid"
    args = experiments.parse_args(argv(tmp_path, model, questions, "--seeds", "2"))
    for seed in (0, 1):
        pool = train.training_pool(train.parse_args(experiments.commands("T", seed, args)[0]))
        for folder in (out / f"T-seed{seed}" / "eval-train", out / "untrained-seed0" / f"eval-train-seed{seed}"):
            asked = [r["question"] for r in data.read_records(next(folder.glob("responses-*.jsonl")))]
            assert sorted(asked) == sorted(q["question"] for q in pool)
        assert [r["question"] for r in report.training_responses(args, "untrained", seed)] == \
            [r["question"] for r in report.training_responses(args, "T", seed)]   # the same order: paired
        entries = report.pushes(args, "T", seed)
        assert len(entries) == 8 and {e[0] for e in entries} == {0}   # 2 steps of 4 questions, epoch 0
        log = data.read_records(out / f"T-seed{seed}" / "metrics.jsonl")
        assert [e[3] for e in entries] == [x for r in log for _, _, x in r["questions"]]
    assert set(json.load(open(out / "T-seed0" / "commands.json"))) == {"train.py", "eval.py", "eval.py eval-train"}
    # the claim: mean over seeds of (accuracy - mean confidence) on each seed's own questions
    figures = [evaluation.figures(report.training_responses(args, "T", s)) for s in (0, 1)]
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| T beats"))
    assert f"| {np.mean([f['accuracy'] - f['mean_confidence'] for f in figures]):+.3f} |" in row, row


def test_a_probed_grid_adds_the_probe_beside_each_runs_own_evaluation(tmp_path, formatted, grid, two_seeds,
                                                                       monkeypatch):
    """The paper grid's probe column: each run is evaluated once more with --probe (the same greedy answers) into
    FOLDER/eval-probe, and the report takes the probe's figures from it. This test model answers too few questions
    right for a probe (eval.py gives no figure and says so): the table shows none, rather than noise."""
    model, questions = formatted
    monkeypatch.setattr(experiments, "PROBED", {"two": ("eval-probe", ("--probe",))})
    grids.GRIDS["two"].append(grids.Table(
        "Probe", ("auroc", "auroc_probe_prompt", "auroc_probe_answer"),
        (("untrained", "untrained", {}), ("T", "run T", {})), plots=False))
    copy_runs(two_seeds, tmp_path / "grid")   # trained and evaluated: what is added is the probe's evaluation
    experiments.main(argv(tmp_path, model, questions))
    out = tmp_path / "grid"
    markdown = (out / "report.md").read_text()
    assert "reliability-probe.png" not in markdown and not (out / "reliability-probe.png").exists()
    for name in ("untrained", "T"):
        first = json.load(open(out / f"{name}-seed0" / "eval" / "metrics.json"))
        probed = json.load(open(out / f"{name}-seed0" / "eval-probe" / "metrics.json"))
        first, probed = next(iter(first.values())), next(iter(probed.values()))
        assert probed["accuracy"] == first["accuracy"] and "auroc_probe_prompt" not in probed
        assert "--probe" in json.load(open(out / f"{name}-seed0" / "commands.json"))["eval.py eval-probe"]
    assert "| Probe |" not in markdown and "probe's AUROC, answer start" not in markdown   # no column of nothing
    # a probe evaluation of other answers is not mixed into the run's figures
    path = out / "T-seed0" / "eval-probe" / "metrics.json"
    tampered = json.load(open(path))
    next(iter(tampered.values()))["accuracy"] += 0.5
    path.write_text(json.dumps(tampered))
    with pytest.raises(experiments.UserError, match="eval-probe holds other answers than the run's evaluation"):
        experiments.main(argv(tmp_path, model, questions))


def test_a_runs_figures_gain_the_probes_from_its_probe_evaluation(tmp_path):
    first = {"n": 6, "accuracy": 0.5, "mean_confidence": 0.7, "auroc": 0.6, "ci": {"auroc": [0.5, 0.7]}}
    probed = {"n": 6, "accuracy": 0.5, "mean_confidence": 0.7, "auroc": 0.6, "auroc_probe_answer": 0.8,
              "e_aurc": 0.1, "ci": {"auroc_probe_answer": [0.7, 0.9]}}
    (tmp_path / "metrics.json").write_text(json.dumps({"final": probed}))
    merged = experiments.with_probe(first, str(tmp_path))
    assert merged["auroc_probe_answer"] == 0.8 and merged["e_aurc"] == 0.1 and merged["auroc"] == 0.6
    assert merged["ci"] == {"auroc": [0.5, 0.7], "auroc_probe_answer": [0.7, 0.9]}


def test_a_grid_stopped_by_sigterm_stops_its_runs_and_leaves_none_behind(tmp_path, formatted):
    """kill, systemd and Slurm send SIGTERM to experiments.py alone: its train.py and eval.py children stop with
    it (train.py saying where it can resume), instead of running on as orphans."""
    model, questions = formatted
    out = tmp_path / "grid"
    script = tmp_path / "grid.py"
    script.write_text(f"""import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import cli, experiments, grids
grids.CONDITIONS["T"] = grids.Condition(train=("--data", "24", "--epochs", "50", "--batch", "4", "--rollouts", "2"))
grids.GRIDS["two"] = [grids.Table("T", ("accuracy",), (("untrained", "untrained", {{}}), ("T", "run T", {{}})))]
cli.entry(lambda: experiments.main({argv(tmp_path, model, questions, "--devices", "cpu,cpu")!r}))
""")
    grid = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while not (out / "T-seed0" / "metrics.jsonl").exists() and time.time() < deadline and grid.poll() is None:
        time.sleep(0.2)   # until T is training
    children = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(out) in open(
        f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")] if os.path.isdir("/proc") else []
    grid.send_signal(signal.SIGTERM)
    said, _ = grid.communicate(timeout=120)
    assert grid.returncode == 130, said
    assert "finished runs are skipped, training resumes" in said
    for pid in children:   # every train.py / eval.py it had started has ended
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert "interrupted" in (out / "T-seed0" / "train.log").read_text()   # train.py stopped, saying so
