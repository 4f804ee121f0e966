"""cli.py: the checked argparse types, and how a script ends on bad input and on Ctrl-C."""

import argparse
import math

import pytest

import cli
from cli import UserError


def test_numbers_refuse_nan_inf_and_what_is_out_of_range():
    assert cli.positive("0.5") == 0.5 and cli.non_negative("0") == 0 and cli.count("3") == 3
    assert cli.natural("0") == 0 and cli.unit_interval("1") == 1
    for kind, text in ((cli.positive, "nan"), (cli.positive, "inf"), (cli.positive, "-inf"), (cli.positive, "0"),
                       (cli.non_negative, "-0.1"), (cli.count, "0"), (cli.count, "1.5"), (cli.natural, "-1"),
                       (cli.unit_interval, "nan"), (cli.unit_interval, "1.01"), (cli.positive, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    assert math.isfinite(cli.positive("1e300"))


def test_bad_input_ends_in_one_line_and_ctrl_c_in_130(capsys):
    def bad():
        raise UserError("--x is wrong; do y")
    with pytest.raises(SystemExit) as e:
        cli.entry(bad)
    assert e.value.code == "error: --x is wrong; do y"   # printed by Python, exit status 1

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.entry(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_sigterm_stops_a_script_as_ctrl_c_does(capsys):
    """kill, systemd, Slurm and torchrun send SIGTERM: it becomes the KeyboardInterrupt every script already
    handles (what it writes finished or removed, a line saying where it stopped), and the handler before it is
    back afterwards."""
    import os
    import signal
    before = signal.getsignal(signal.SIGTERM)

    def killed():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not stopped")
    with pytest.raises(SystemExit) as e:
        cli.entry(killed)
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before
