"""Data-parallel KD training: two DDP workers (a gloo group of two CPU processes, no Ray) take the
step one worker takes on the same batch: same gradient, same norm, for both normalisations."""

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_training import Gradients, Tok, sequences, tiny_llama

from specdraft.pipeline.config import TrainConfig
from specdraft.pipeline.objectives import KDOptions
from specdraft.pipeline.trainer import train_kd

pytestmark = pytest.mark.integration  # two gloo processes, ~100 s

OPTIONS = {
    "all": KDOptions(),
    # one threshold over both workers' tokens (scope=global): the kept set is the one-worker one
    "kept": KDOptions(selection="top", k=0.4, scope="global", normalize="kept"),
}


def one_step(out, normalize: str) -> tuple[torch.Tensor, float]:
    """The first optimizer step's gradient and logged grad norm of a KD run on 8 sequences (one
    batch of 8: each of W workers gets a different 8 / W of them)."""
    teacher, base, reference = tiny_llama(1, hidden=32), tiny_llama(2), tiny_llama(3)
    grads = Gradients()
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-2, log_every=1)
    history, _ = train_kd(
        copy.deepcopy(base),
        teacher,
        sequences(8),
        Tok(),
        cfg,
        out,
        seed=0,
        reference=reference,
        options=OPTIONS[normalize],
        callbacks=[grads],
    )
    return grads.steps[0], history[0]["grad_norm"]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for normalize in OPTIONS:
            grad, norm = one_step(Path(out) / f"rank{rank}-{normalize}", normalize)
            torch.save({"grad": grad, "grad_norm": norm}, f"{out}/rank{rank}-{normalize}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_workers_take_the_one_worker_step(tmp_path):
    # one group of two processes runs both normalisations (starting one costs more than a run)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for normalize in OPTIONS:
        grad, norm = one_step(tmp_path / f"single-{normalize}", normalize)
        assert norm > 0
        for rank in range(2):  # all-reduced: both replicas hold the one-worker gradient
            ddp = torch.load(tmp_path / f"rank{rank}-{normalize}.pt")
            assert ddp["grad_norm"] == pytest.approx(norm, rel=1e-4), normalize
            torch.testing.assert_close(ddp["grad"], grad, atol=1e-7, rtol=1e-4)
