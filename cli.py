"""What the scripts' command lines share: the help layout, flags checked at the door, and how a script ends.

Every flag is checked before anything is loaded or written (a typo costs a second, not an hour of loading and
training): numbers are finite and in range, a device is one torch has here, an output path can be written.
A script ends on bad input with one line `error: ...` and exit code 1, on Ctrl-C with one line and 130.
"""

import argparse
import math
import os
import signal
import sys
import tempfile

import torch


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file). Scripts print it as a one-line error and exit."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the examples' layout and shows every default that is set."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------------------
# argparse types: each refuses what makes no sense for its flag, nan and inf included, with what it expected.


def _number(text, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive(text):
    """A finite number above 0: a learning rate, a temperature, a clip norm."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def finite(text):
    """Any finite number, negative ones included."""
    return _number(text)


def non_negative(text):
    """A finite number, 0 or more: a weight or a cap where 0 turns the feature off."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def unit_interval(text):
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def count(text):
    """An integer, 1 or more: sizes and counts."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def natural(text):
    """An integer, 0 or more: seeds (numpy's generators take no negative seed), counts that may be 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def seed(text):
    """A seed: an integer from 0 to 2^63 - 1 (torch's generators take no more, numpy's no negative one)."""
    value = natural(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2^63, got {text}")
    return value


def device(text):
    """cpu, cuda or cuda:K, and only what this machine has."""
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:K") from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA GPU (or this torch is a CPU build); "
                                         "use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


# ----------------------------------------------------------------------------------------------------------
# Output paths, checked before the work whose result they hold.


def check_writable(path, flag, folder=False):
    """Refuse an output path that cannot be written: empty, a folder where a file goes (or the reverse), under
    a file, or in a folder this process may not write to. Creates nothing (the check writes and removes a
    temporary file in the nearest folder that exists)."""
    if not path:
        raise UserError(f"{flag} is empty; give it a path")
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{flag} {path} is a link to {os.readlink(path)}, which does not exist; remove the link or "
                        "make its target")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; it must be a folder (new or existing)")
    if not folder and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; it must name a file")
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); choose another place") from None


# ----------------------------------------------------------------------------------------------------------


def entry(main):
    """Start a script's main(): bad input ends in one line and exit code 1, Ctrl-C in one line and 130. A
    KeyboardInterrupt raised with a message (train.py's: where the last checkpoint is) prints that message.
    SIGTERM (what kill, systemd, Slurm and torchrun send) stops a script as Ctrl-C does, so that what it was
    writing is finished or removed (data.write_atomic), never left half-written, and it says where it stopped."""
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt(signum, frame):
    raise KeyboardInterrupt
