"""Process start-up on every launcher, and the explicit parallel layout object.

Launchers: ``deepspeed`` and ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* already set),
``srun`` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master = first host of the node list) and
``mpirun``/``mpiexec`` (OMPI_COMM_WORLD_* or PMI_*; we set MASTER_ADDR/PORT ourselves because
DeepSpeed's own MPI discovery forces a non-loopback address and port 29500).

Rank order (the same in megatron-core's groups and DeepSpeed's PipeModelDataParallelTopology):
tensor fastest, then data, then pipe::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

There is no process-group global of our own: :class:`ParallelDims` is built once and passed
explicitly. (megatron-core's tensor-parallel layers read its ``parallel_state`` internally; we
initialise it from the same object so the two agree.)
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported where it is used: parsing a config must not wait ~1.5 s for it
    import torch


# --------------------------------------------------------------------------------------------
# Launcher environment
# --------------------------------------------------------------------------------------------
@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # 'torchrun' | 'slurm' | 'mpi' | 'single'


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-005,009],login1' -> 'gpu003',
    'rack[1-2]-gpu[01-04]' -> 'rack1-gpu01' (every bracket of the first host takes its first value).

    The SLURM scripts ask `scontrol show hostnames` instead (slurm/common.sh); this parser serves launches
    without them (a bare `srun python -m mcd_scale.train`)."""
    text = nodelist.strip()
    out, i = [], 0
    while i < len(text) and text[i] != ",":  # a comma outside brackets ends the first host
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                raise ValueError(f"cannot parse SLURM node list {nodelist!r}: unclosed '['")
            first = text[i + 1:end].split(",")[0].split("-")[0]
            if not first:
                raise ValueError(f"cannot parse SLURM node list {nodelist!r}: empty range")
            out.append(first)
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    if not out:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return "".join(out)


def _slurm_port(job_id: str) -> int:
    # Same on every task of the job without communication; avoids 29500 clashes between jobs on a node.
    # 15000-29999 stays below Linux's ephemeral range (32768-60999), where an outgoing connection of
    # another process could already hold the port; slurm/common.sh derives MASTER_PORT the same way.
    return 15000 + (int(job_id) % 15000) if job_id.isdigit() else 29500


def detect_launch_env(env: Optional[dict] = None) -> LaunchEnv:
    """Read rank/world/master from whichever launcher started us (pure: reads `env`)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    # MPI before SLURM: `mpirun` inside an sbatch script inherits the batch step's SLURM_PROCID=0 on
    # every rank; an MPI launcher's own per-process variables are the truth (under srun --mpi=pmi2/pmix
    # both are set and agree).
    for rank_key, size_key, local_key in (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK")):
        if rank_key in env and size_key in env:
            # "" = not known yet: export_launch_env asks the ranks over MPI (_mpi_agree_on_master).
            addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "")
            port = int(env.get("MASTER_PORT") or (_slurm_port(env["SLURM_JOB_ID"]) if "SLURM_JOB_ID" in env else 0))
            return LaunchEnv(int(env[rank_key]), int(env[size_key]), int(env.get(local_key, 0)), addr, port, "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist or "127.0.0.1")
        port = int(env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID", "")))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)), "single")


def _mpi_agree_on_port(le: LaunchEnv) -> int:
    """Under MPI, rank 0 picks a free port and broadcasts it (MASTER_PORT wins if set)."""
    if le.master_port:
        return le.master_port
    from mpi4py import MPI  # imported only under MPI

    port = _free_port() if le.rank == 0 else None
    return int(MPI.COMM_WORLD.bcast(port, root=0))


def master_addr_for_hosts(hostnames: list[str]) -> str:
    """Rendezvous address from every rank's hostname (rank order): loopback when all ranks share one
    host, else rank 0's host name (an `mpirun` across nodes then needs no MASTER_ADDR)."""
    if not hostnames:
        raise ValueError("no hostnames")
    return "127.0.0.1" if len(set(hostnames)) == 1 else hostnames[0]


def _mpi_agree_on_master(le: LaunchEnv) -> str:
    """Under MPI without MASTER_ADDR or a SLURM node list: the ranks exchange host names."""
    if le.master_addr:
        return le.master_addr
    from mpi4py import MPI  # imported only under MPI

    return master_addr_for_hosts(MPI.COMM_WORLD.allgather(socket.gethostname()))


def export_launch_env(le: LaunchEnv) -> LaunchEnv:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* so torch and DeepSpeed skip their own discovery."""
    if le.launcher == "mpi":
        le.master_addr = _mpi_agree_on_master(le)
        le.master_port = _mpi_agree_on_port(le)
    elif le.launcher == "single" and not le.master_port:
        le.master_port = _free_port()
    os.environ.update({
        "RANK": str(le.rank), "WORLD_SIZE": str(le.world_size), "LOCAL_RANK": str(le.local_rank),
        "LOCAL_SIZE": os.environ.get("LOCAL_SIZE", str(le.world_size)),
        "MASTER_ADDR": le.master_addr, "MASTER_PORT": str(le.master_port),
    })
    return le


# --------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------
@dataclass
class ParallelDims:
    """World layout: tensor x data x pipe, tensor fastest. Build with :meth:`build`."""
    world_size: int
    tp: int
    pp: int
    rank: int = 0
    groups: dict = field(default_factory=dict, repr=False)
    # The one device rule: every tensor our loop, objectives, losses, guards, metrics and tools create or
    # receive lives here -- cuda:LOCAL_RANK under NCCL, the host under gloo (set by build()).
    device: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.device is None:  # a layout built by hand (tests, tools without a process group): the host
            # lazy: loads torch; importing this module does not need it
            import torch

            self.device = torch.device("cpu")
        if self.world_size % (self.tp * self.pp) != 0:
            raise ValueError(f"world size {self.world_size} not divisible by tp*pp={self.tp * self.pp}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    # --- pure mapping (tested against DeepSpeed's topology for 1, 2, 4, 8 ranks) ---
    def coords(self, rank: Optional[int] = None) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        r = self.rank if rank is None else rank
        return r // (self.dp * self.tp), (r // self.tp) % self.dp, r % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    def tp_ranks(self, rank: Optional[int] = None) -> list[int]:
        p, d, _ = self.coords(rank)
        return [self.rank_of(p, d, t) for t in range(self.tp)]

    def dp_ranks(self, rank: Optional[int] = None) -> list[int]:
        p, _, t = self.coords(rank)
        return [self.rank_of(p, d, t) for d in range(self.dp)]

    def pp_ranks(self, rank: Optional[int] = None) -> list[int]:
        _, d, t = self.coords(rank)
        return [self.rank_of(p, d, t) for p in range(self.pp)]

    @property
    def pp_rank(self) -> int:
        return self.coords()[0]

    @property
    def dp_rank(self) -> int:
        return self.coords()[1]

    @property
    def tp_rank(self) -> int:
        return self.coords()[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # --- groups ---
    @classmethod
    def build(cls, tp: int, pp: int, timeout_s: float = 600.0) -> "ParallelDims":
        """Create megatron-core's groups (tp-dp-pp order) on an initialised torch.distributed.

        ``timeout_s`` bounds every collective on those groups (ZeRO's and TP's traffic runs on them, not on
        the world group): megatron-core's own default is 30 minutes."""
        # lazy: loads torch, megatron; importing this module does not need them
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        world, rank = dist.get_world_size(), dist.get_rank()
        dims = cls(world_size=world, tp=tp, pp=pp, rank=rank, device=backend_device())
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     order="tp-cp-ep-dp-pp", distributed_timeout_minutes=timeout_s / 60.0)
        dims.groups = {"tp": ps.get_tensor_model_parallel_group(), "dp": ps.get_data_parallel_group(),
                       "pp": ps.get_pipeline_model_parallel_group()}
        # The groups we rely on must hold exactly the ranks our mapping says.
        for name, expected in (("tp", dims.tp_ranks()), ("dp", dims.dp_ranks()), ("pp", dims.pp_ranks())):
            got = sorted(dist.get_process_group_ranks(dims.groups[name]))
            if got != expected:
                raise RuntimeError(f"megatron-core {name} group {got} != expected {expected} on rank {rank}")
        return dims

    @property
    def tp_group(self):
        return self.groups.get("tp")

    @property
    def dp_group(self):
        return self.groups.get("dp")

    @property
    def pp_group(self):
        return self.groups.get("pp")

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)

    def deepspeed_topology(self):
        """DeepSpeed's pipeline topology (axes pipe, data, model) for the same layout."""
        # lazy: loads deepspeed; importing this module does not need it
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed expects, answering from a ParallelDims (megatron names included)."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_group(self):
        return self.dims.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.dims.dp_rank

    def get_data_parallel_world_size(self):
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_pipeline_model_parallel_rank(self):
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.dims.pp

    def get_pipeline_model_parallel_group(self):
        return self.dims.pp_group


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------
def backend_for_device(env: Optional[dict] = None) -> str:
    """NCCL when CUDA is visible and DeepSpeed's accelerator is CUDA, else gloo.

    ``DS_ACCELERATOR`` (set by the tests, or by anyone forcing DeepSpeed onto the host) wins over CUDA's
    presence: DeepSpeed then keeps its tensors on the host, and an NCCL group would reject them, so a
    test suite run on a GPU machine would fail where it passes on a CPU one."""
    # lazy: loads torch; importing this module does not need it
    import torch

    env = os.environ if env is None else env
    accelerator = env.get("DS_ACCELERATOR", "").strip().lower()
    if accelerator not in ("", "cuda"):
        return "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device index of a rank with ``local_rank`` on a node where it sees ``visible`` devices.

    Every GPU visible (one process per node sees them all): ``local_rank``. One visible GPU per rank (SLURM's
    ``--gpus-per-task=1`` or a per-rank ``CUDA_VISIBLE_DEVICES``): device 0, whatever the local rank. Any
    other count cannot be mapped without guessing (``local_rank % visible`` would put two ranks on one GPU
    while DeepSpeed placed them on ``cuda:LOCAL_RANK``), so it is an error naming the fix."""
    if visible < 1:
        raise ValueError("no CUDA device is visible to this rank; check CUDA_VISIBLE_DEVICES")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise ValueError(f"LOCAL_RANK {local_rank} sees {visible} CUDA devices: bind one GPU per rank or make every GPU "
                     f"of the node visible to every rank (CUDA_VISIBLE_DEVICES)")


def disable_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce op.

    Why: on CPU, ``deepspeed.init_distributed`` JIT-compiles ``deepspeed_shm_comm`` (~25 s) and, when
    all ranks are local (LOCAL_SIZE == world size, which every launcher sets), each rank creates a
    ~66 MiB ``/dev/shm/deepspeed_allreduce_buffer_*`` file that is never unlinked. /dev/shm is RAM:
    a few hundred short multi-rank runs (a test suite, a sweep) fill it and the machine starts to
    thrash. The op only serves ``inference_all_reduce``, which training never calls; gloo/NCCL do
    every collective we use. Marking it incompatible is DeepSpeed's own switch for "op unavailable".
    """
    # lazy: loads deepspeed; importing this module does not need it
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(tp: int = 1, pp: int = 1, timeout_s: float = 600.0) -> ParallelDims:
    """Start torch.distributed (via DeepSpeed's comm) under any launcher and build the layout.

    ``timeout_s`` (config ``distributed.timeout_s``) bounds the rendezvous and every collective, on the
    world group and on megatron-core's groups: a rank whose peer died or hangs fails after it instead of
    waiting forever (docs/reliability.md)."""
    # lazy: loads torch, deepspeed; importing this module does not need them
    import torch

    import deepspeed

    disable_deepspeed_shm_allreduce()
    le = export_launch_env(detect_launch_env())
    backend = backend_for_device()
    if backend == "nccl":  # the engine hands the same index to DeepSpeed (TrainEngine: args.device_rank)
        torch.cuda.set_device(cuda_device_index(le.local_rank, torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelDims.build(tp=tp, pp=pp, timeout_s=timeout_s)


# see shutdown(): time for gloo worker threads to take the GIL and free finished work before exit
_GLOO_WORKER_GRACE_S = 0.1


def shutdown(drain: bool = True) -> None:
    """Tear down megatron's groups and the process group.

    ``drain`` (success paths only): a barrier, then a short sleep, before destroying the group.
    A ZeRO-3 engine leaves parameter prefetches queued on gloo that nobody waits for, and the
    engine (so the C++ groups and their worker threads) lives until interpreter exit. A gloo worker
    destroys a finished all-gather *after* signalling completion, and dropping its tensors needs
    the GIL; if the interpreter is already finalizing, that thread is unwound and the process
    aborts ("terminate called without an active exception", seen in a core dump:
    ``~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``). Gloo's
    barrier waits for all queued work; the sleep releases the GIL so the workers can drop it
    (measured abort rates: docs/architecture.md, "Teardown"). On an error path a peer may never
    reach the barrier, so callers pass ``drain=False``.
    """
    # lazy: loads torch, megatron; importing this module does not need them
    import torch.distributed as dist

    from mcd_scale.parallel import collectives

    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except Exception:  # pragma: no cover - best effort on exit paths
        pass
    if dist.is_available() and dist.is_initialized():
        if drain:
            collectives.barrier()
            time.sleep(_GLOO_WORKER_GRACE_S)  # GIL released: let gloo workers free finished work
        dist.destroy_process_group()


def all_ranks_agree_ok(ok: bool, message: str = "") -> None:
    """Raise on every rank if any rank failed (so errors never leave peers hanging in a collective)."""
    # lazy: loads torch; importing this module does not need it
    import torch

    from mcd_scale.parallel import collectives

    if not collectives.initialized():
        if not ok:
            raise RuntimeError(message)
        return
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=collectives.comm_device())
    failed = int(collectives.all_reduce(flag, "sum").item())
    if failed > 0:
        raise RuntimeError(message or f"{failed} rank(s) failed; see their logs")


def to_device(obj: Any, device: "torch.device") -> Any:
    """``obj`` (tensors in nested tuples/lists/dicts) on ``device``: the one place a micro-batch's data moves.

    Called once per micro-batch by the engine (mcd_scale/training/engine.py). To a CUDA device the host tensors go
    through pinned memory with ``non_blocking=True``, so the copy overlaps the previous micro-batch's compute;
    tensors already there are returned as they are (no copy)."""
    # lazy: loads torch; importing this module does not need it
    import torch

    if torch.is_tensor(obj):
        if obj.device == device:
            return obj
        if device.type == "cuda" and obj.device.type == "cpu":
            return (obj if obj.is_pinned() else obj.pin_memory()).to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def backend_device() -> "torch.device":
    """cuda:<current> when the process group's backend is NCCL, else the host (gloo, or no group)."""
    # lazy: loads torch; importing this module does not need it
    from mcd_scale.parallel.collectives import comm_device

    return comm_device()


def device() -> "torch.device":
    """Deprecated spelling of :func:`backend_device` (prefer ``dims.device``)."""
    return backend_device()


def rank0_print(*args: Any, **kwargs: Any) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
