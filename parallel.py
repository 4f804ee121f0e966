"""More than one process: `torchrun --nproc-per-node K train.py ...` (or eval.py). Each process samples and rewards
its share of a step's questions (a question's N rollouts stay together, so its baseline is unchanged) and the
LoRA gradients are summed; rank 0 alone writes files. Without torchrun this is rank 0 of 1 and all of it is a
no-op. train.py and eval.py both use these helpers.
"""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from cli import UserError


DIST_TIMEOUT = datetime.timedelta(minutes=30)   # a rank that died stops the others with an error, not a hang


@contextlib.contextmanager
def distributed(args):
    """Join torchrun's process group for the duration: NCCL on CUDA (each process on its LOCAL_RANK's GPU),
    gloo on a CPU. Yields (rank, world size); (0, 1) without torchrun."""
    if "WORLD_SIZE" not in os.environ:
        yield 0, 1
        return
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise UserError(f"process {rank} wants GPU {local}, but this machine has {torch.cuda.device_count()}; "
                            "run at most as many processes per node as GPUs (--nproc-per-node)")
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
    try:
        yield rank, world
        # Leave together, once rank 0 has written everything. Without this, 1 two-process gloo run in 30 ended
        # with rank 1 aborting in its teardown ("terminate called without an active exception") and torchrun
        # failing the run; with it, none in 40 (docs/distributed.md). After an error nobody waits here.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def all_reduce_gradients(model):
    """Sum the LoRA gradients over the processes, so that every one takes the same AdamW step. By hand rather
    than through DDP: at rank 1 they are a few kB, and nothing else of the model changes."""
    if dist.is_initialized():
        for p in model.parameters():
            if p.requires_grad:
                dist.all_reduce(p.grad)


def rank_and_world():
    """(this process's rank, the number of processes); (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(obj):
    """Every process's obj, in rank order (a list of one without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


def check_shares(args, n_pool, world):
    """Under torchrun every process needs a whole, equal share of each step's questions."""
    if world == 1:
        return
    if args.batch < world:
        raise UserError(f"{world} processes but --batch {args.batch} questions a step: run at most {args.batch} "
                        "processes, or raise --batch")
    if args.batch % world:
        raise UserError(f"--batch {args.batch} does not divide among {world} processes; use a multiple of {world}, "
                        f"e.g. --batch {args.batch // world * world or world}")
    if n_pool % args.batch % world:
        raise UserError(f"the last step of each epoch has {n_pool % args.batch} questions, which do not divide "
                        f"among {world} processes; make --data a multiple of --batch")
