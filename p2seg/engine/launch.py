"""Detectron2's ``launch`` on CPU too: ``--num-gpus N`` with ``MODEL.DEVICE cpu`` starts N CPU
processes on the gloo backend (each with its share of the cores); on CUDA it is Detectron2's
``launch`` unchanged (NCCL, one process per GPU).

This lets every distributed path (DDP training, sharded data, the export's per-rank sidecars, the
evaluators' gathers) run without a GPU, in CI.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = ["launch", "cpu_threads_per_process"]


def cpu_threads_per_process(num_processes: int) -> int:
    """Threads for each of ``num_processes`` CPU processes so that together they use at most the
    cores the user allows (``OMP_NUM_THREADS`` when set, else every core)."""
    allowed = int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count() or 1)
    return max(1, allowed // max(1, num_processes))


def launch(main_func, num_processes: int, num_machines: int = 1, machine_rank: int = 0, dist_url=None,
           args=(), device: str = "cuda", timeout: timedelta = timedelta(minutes=30)):
    """Run ``main_func(*args)`` in ``num_processes`` processes per machine.

    Args:
        num_processes: ``--num-gpus``; on CPU, processes per machine.
        device: the config's ``MODEL.DEVICE``: "cpu" uses gloo, anything else Detectron2's launch.
    """
    if not device.startswith("cpu"):
        return detectron2_launch(main_func, num_processes, num_machines=num_machines, machine_rank=machine_rank,
                                 dist_url=dist_url, args=args, timeout=timeout)
    world_size = num_machines * num_processes
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url tcp://<host of machine 0>:<port> is needed with --num-machines > 1")
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    threads = cpu_threads_per_process(num_processes)
    print(f"--num-gpus {num_processes} with MODEL.DEVICE cpu: {num_processes} CPU processes per machine "
          f"(world size {world_size}, gloo backend), {threads} thread(s) each", flush=True)
    mp.spawn(_cpu_worker, nprocs=num_processes, daemon=False,
             args=(main_func, world_size, num_processes, machine_rank, dist_url, args, timeout, threads))


def _cpu_worker(local_rank, main_func, world_size, num_processes, machine_rank, dist_url, args, timeout, threads):
    """One CPU process: the gloo process group, Detectron2's local group, its threads, then main."""
    torch.set_num_threads(threads)
    rank = machine_rank * num_processes + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    for i in range(world_size // num_processes):
        group = dist.new_group(list(range(i * num_processes, (i + 1) * num_processes)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
