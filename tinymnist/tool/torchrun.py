"""`tinymnist train` under torchrun: joining the processes, who speaks, and failures as one line.

Without torchrun's WORLD_SIZE, RANK and LOCAL_RANK, `from_env` returns None and train runs
in one process. One model: every process trains it on its slice of each batch, the gradient
all-reduced (transforms/all_reduce.py). N models: the processes split the models (sweep.py).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from tinymnist.algorithm.config import TrainConfig
from tinymnist.algorithm.train import TrainState
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint
from tinymnist.tool.devices import resolve_device

# How long a collective waits for a hung peer (a killed one fails the others at once): what one
# rank may run ahead of the others by, as the leader saves or one rank compiles slower.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# A sweep's ranks meet once per evaluation; a share one model larger may keep the others
# waiting for much of an epoch, so they wait as long as torch's default.
SWEEP_TIMEOUT = dist.default_pg_timeout
# How long a rank other than 0 waits for rank 0 to listen: torchrun starts every rank at
# once, so a minute means a wrong address or no rank 0. $TINYMNIST_RENDEZVOUS_TIMEOUT: seconds.
RENDEZVOUS_TIMEOUT_ENV = "TINYMNIST_RENDEZVOUS_TIMEOUT"
RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=60)
RENDEZVOUS_MAX = datetime.timedelta(days=1)
RENDEZVOUS_RETRY_S = 0.2  # between two tries to connect: a refused connection answers at once
CONNECT_TIMEOUT_S = 1.0  # one try, where a firewall drops the packets instead of refusing them


@dataclass(frozen=True)
class Cluster:
    """This process's place among torchrun's processes."""

    rank: int  # 0 .. world_size - 1, across all machines
    world_size: int
    local_rank: int  # on this machine: which GPU is ours

    @property
    def leader(self) -> bool:
        """Rank 0 is the run's one voice: it prints, writes --metrics and --save-model."""
        return self.rank == 0


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched(env=os.environ) -> bool:
    """Whether torchrun (or someone by hand) started this process as one of a group."""
    return all(name in env for name in TORCHRUN_VARIABLES)


def from_env(env=os.environ) -> Cluster | None:
    """torchrun's place for this process, or None without torchrun; values set by hand are
    checked before any process waits for another."""
    if not launched(env):
        if "RANK" in env and "WORLD_SIZE" in env:  # a group meant by hand, one variable short
            raise TinyMnistError(
                "RANK and WORLD_SIZE are set but LOCAL_RANK is not: torchrun sets all three; set it too "
                "(the process's index on its machine), or unset RANK and WORLD_SIZE for one process"
            )
        return None
    try:
        rank, world_size, local_rank = (int(env[name]) for name in TORCHRUN_VARIABLES)
    except ValueError:
        given = ", ".join(f"{name}={env[name]!r}" for name in TORCHRUN_VARIABLES)
        raise TinyMnistError(f"{given}: torchrun's variables must be whole numbers; start with torchrun") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise TinyMnistError(
            f"RANK={rank} of WORLD_SIZE={world_size} (LOCAL_RANK={local_rank}) is no process of a "
            f"group: RANK runs from 0 to WORLD_SIZE-1; start with torchrun"
        )
    return Cluster(rank, world_size, local_rank)


def join(cluster: Cluster, device: torch.device, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> None:
    """Join torchrun's process group: NCCL between GPUs, gloo between CPUs."""
    if not cluster.leader:
        wait_for_rank_0(cluster)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError) as e:  # a rendezvous that never completes, a bad address
        raise TinyMnistError(
            f"rank {cluster.rank} of {cluster.world_size}: could not join the other processes ({one_line(e)})"
        ) from None


def wait_for_rank_0(cluster: Cluster, env=os.environ) -> None:
    """Return once something listens at MASTER_ADDR:MASTER_PORT (the group's store), or raise
    one line. torch's own connect would wait the whole collective timeout inside C++, where no
    signal gets through; here a signal ends the wait between two tries."""
    host, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if host is None or port is None:
        return
    if not port.isdigit():
        raise TinyMnistError(f"MASTER_PORT={port!r}: must be a port number; start with torchrun")
    timeout = rendezvous_timeout(env)
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                reason = e.strerror or str(e) or type(e).__name__
                raise TinyMnistError(
                    f"rank {cluster.rank} of {cluster.world_size}: no rank 0 answered at MASTER_ADDR={host} "
                    f"MASTER_PORT={port} within {timeout.total_seconds():g} s ({reason}); check both "
                    f"variables and start rank 0 (torchrun starts every rank; ${RENDEZVOUS_TIMEOUT_ENV} "
                    f"waits longer)"
                ) from None
        time.sleep(RENDEZVOUS_RETRY_S)


def rendezvous_timeout(env=os.environ) -> datetime.timedelta:
    """RENDEZVOUS_TIMEOUT, or $TINYMNIST_RENDEZVOUS_TIMEOUT seconds."""
    text = env.get(RENDEZVOUS_TIMEOUT_ENV)
    if text is None:
        return RENDEZVOUS_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    most = RENDEZVOUS_MAX.total_seconds()
    if not 0 < seconds <= most:  # also NaN
        raise TinyMnistError(f"{RENDEZVOUS_TIMEOUT_ENV}={text!r}: give seconds, more than 0 and at most {most:g}")
    return datetime.timedelta(seconds=seconds)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(n_models: int, cluster: Cluster) -> slice:
    """This rank's models of a sweep: a contiguous share; where N does not divide, the first ranks take one more."""
    if n_models < cluster.world_size:
        raise TinyMnistError(
            f"{cluster.world_size} processes for {n_models} models (--seeds/--lr): each process trains "
            f"whole models; start at most {n_models} processes or train more models"
        )
    base, extra = divmod(n_models, cluster.world_size)
    start = cluster.rank * base + min(cluster.rank, extra)
    return slice(start, start + base + (cluster.rank < extra))


def this_process(config: TrainConfig, cluster: Cluster | None) -> TrainConfig:
    """The config as this one of torchrun's processes runs it (unchanged without torchrun):
    its own device; output files (--save-model, --metrics, --tensorboard) on rank 0 only."""
    if cluster is None:
        return config
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", cluster.local_rank)  # one GPU per local rank
    sweep = config.n_models > 1  # whole models per process, each on the whole batch
    if sweep:
        share(config.n_models, cluster)  # more processes than models: one line now, before any joins
    elif config.batch_size % cluster.world_size:
        raise TinyMnistError(
            f"--batch-size {config.batch_size} is the global batch and must divide evenly among the "
            f"{cluster.world_size} processes; pass a multiple of {cluster.world_size}"
        )
    # An NCCL collective inside a CUDA graph is untested here; a sweep's step has none.
    config = replace(config, device=str(device), cuda_graphs=config.cuda_graphs and sweep)
    if not cluster.leader:
        config = replace(config, save_model=None, metrics=None, tensorboard=None)
    return config


@contextlib.contextmanager
def group(config: TrainConfig, cluster: Cluster | None) -> Iterator[None]:
    """Inside torchrun's process group (nothing without torchrun). Only rank 0 prints; the others'
    errors still reach stderr. A peer that fails becomes one line; leaving waits for every rank."""
    if cluster is None:
        yield
        return
    timeout = SWEEP_TIMEOUT if config.n_models > 1 else COLLECTIVE_TIMEOUT
    join(cluster, torch.device(config.device), timeout)
    with contextlib.ExitStack() as stack:
        stack.callback(leave)
        if not cluster.leader:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        stack.enter_context(peer_failures(cluster, timeout, kept=functools.partial(saved_epoch, config.save_model)))
        yield
        dist.barrier()  # every rank past its last collective before any leaves


def saved_epoch(path: str | None) -> str:
    """What --save-model holds now, read back (mmap: no tensor data is read)."""
    saved = None if path is None else checkpoint.peek(path)
    if saved is None:  # no file yet, or not a checkpoint: nothing of this run is kept there
        return ""
    return f"; the checkpoint of epoch {saved['epoch']} is kept in {path}"


# ---- randomness -------------------------------------------------------------------------


def own_dropout(state: TrainState, seed: int, cluster: Cluster, device: torch.device) -> TrainState:
    """The state with this rank's own dropout generator. Rank 0 keeps the run's (its checkpoint
    resumes like one process's); rank r > 0 draws from seed + r + N * epoch, distinct from every
    other rank and epoch, the same on every rerun."""
    if cluster.leader:
        return state
    dropout_seed = seed + cluster.rank + cluster.world_size * state.epoch
    rng = {**state.rng, "cpu": torch.Generator().manual_seed(dropout_seed).get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.Generator(device).manual_seed(dropout_seed).get_state()
    return TrainState(state.params, state.opt_state, state.epoch, rng)


# ---- faults -----------------------------------------------------------------------------


# Words in the messages of gloo's and NCCL's failed collectives (the transport raises a
# plain RuntimeError): any other error is a bug in this process and keeps its traceback.
COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|c10d|connection|timed out|timeout", re.IGNORECASE)


@contextlib.contextmanager
def peer_failures(cluster: Cluster, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT, kept: Callable[[], str] = str):
    """A collective that failed (a peer died, or hung past `timeout`) as one line, ending with
    `kept()`: what this run has saved. Gloo and NCCL name the peer's address, not its rank."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not isinstance(e, dist.DistError) and not COLLECTIVE_FAILURE.search(str(e)):
            raise
        peer = f"rank {1 - cluster.rank}" if cluster.world_size == 2 else "another rank"
        raise TinyMnistError(
            f"rank {cluster.rank} of {cluster.world_size}: lost {peer}, which stopped or did not answer "
            f"within {timeout.total_seconds():g} s ({one_line(e)}){kept()}"
        ) from None


def one_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an error message, without gloo's [source:line] prefix, cut at a word boundary."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
    return first if len(first) <= limit else first[:limit].rsplit(" ", 1)[0] + " ..."
