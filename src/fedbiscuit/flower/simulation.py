"""Flower's simulation runtime: the package's ServerApp and ClientApp with N virtual SuperNodes on Ray.

Flower 1.41 documents one way to run a simulation: ``flwr run APP CONNECTION`` against a SuperLink started
in simulation mode (``flower-superlink --simulation``), with the federation's size and resources given as
``--federation-config``. The Python ``flwr.simulation.run_simulation`` still exists but is deprecated in
1.41 and cannot carry the app's run config, so the ServerApp would have to be a different one. The path here
is the documented one, and it runs the very app folder a deployment runs (deploy.write_app): the ServerApp
reads the run config from it, and each virtual node gets the node config ``partition-id=i
num-partitions=N``, which the ClientApp maps to the i-th client exactly as it does on a real SuperNode.

``run_simulation``:

1. checks the config and the run folder here, before anything starts (a refused resume costs no Ray start);
2. starts a SuperLink in simulation mode on a free loopback port, with a private FLWR_HOME and Ray temp
   folder, telemetry and update checks off (it runs offline), and Ray's object store capped;
3. runs ``flwr run APP sim --federation-config ... --stream``: the SuperLink starts ``flwr-simulation``,
   which starts Ray, runs the ServerApp in a thread and the ClientApp in Ray actors (cores // cpus_per_client
   of them); each actor loads the base model once and serves every node sent to it;
4. reads the run's final status with ``flwr ls``, stops the SuperLink, and ends whatever is left of the
   processes it started (Ray's included, found by a marker in their environment);
5. returns the run's summary from the run folder, as run_server and run_inprocess do.

Flower's and Ray's output goes to ``<run_dir>/flower-sim/``, not to the console.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..runs import RunDir, read_records
from . import deploy

CONNECTION = "sim"  # the SuperLink connection's name in the private FLWR_HOME
MARKER = "FEDBISCUIT_SIMULATION"  # in the environment of every process a simulation starts
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log lines
EXTRA = 'pip install "fedbiscuit[simulation]"  (flwr[simulation]==1.41.0, which pins ray 2.55.1)'


class SimulationError(RuntimeError):
    """The simulation did not complete; the message says how it ended and where Flower's log is."""


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise SimulationError(f"Flower's simulation runtime needs Ray, which is not installed: {EXTRA}")


def check_simulation_config(cfg: RunConfig, num_supernodes: int, num_clients: int) -> None:
    """Settings a simulation cannot run with, named by their keys (ValueError)."""
    sim, flower = cfg.federated.flower.simulation, cfg.federated.flower
    if not 1 <= num_supernodes <= num_clients:
        raise ValueError(
            f"--supernodes {num_supernodes}: node i holds the i-th client, and the config's data yields "
            f"{num_clients} clients (give 1..{num_clients}, or leave it out for one node per client)"
        )
    if flower.num_clients is not None and flower.num_clients != num_supernodes:
        raise ValueError(
            f"federated.flower.num_clients={flower.num_clients}, but the simulation has {num_supernodes} "
            "nodes: the ServerApp would wait for clients that never come (unset it, or make them equal)"
        )
    cores = sim.num_cpus or os.cpu_count() or 1
    if sim.cpus_per_client > cores:
        raise ValueError(
            f"federated.flower.simulation.cpus_per_client={sim.cpus_per_client} exceeds the {cores} cores "
            "Ray may use (federated.flower.simulation.num_cpus, or every core): no ClientApp actor would fit"
        )
    device = cfg.model.device
    if device.startswith("cuda") and sim.gpus_per_client == 0:
        raise ValueError(
            f"model.device={device}, but federated.flower.simulation.gpus_per_client=0 hides the GPUs from "
            "the ClientApp actors: give each a share (e.g. 0.25) or use model.device=cpu"
        )
    if device == "cpu" and sim.gpus_per_client > 0:
        raise ValueError(
            f"federated.flower.simulation.gpus_per_client={sim.gpus_per_client:g} reserves GPU for actors that "
            "run on the CPU (model.device=cpu): set it to 0, or model.device=cuda"
        )
    if device.startswith("cuda:"):
        # Ray gives each actor its GPU share through CUDA_VISIBLE_DEVICES, so every actor sees its own GPU as
        # cuda:0; a fixed index would put all actors on one GPU, or on one they were not given
        raise ValueError(
            f"model.device={device}: in a simulation each ClientApp actor sees the GPU Ray gave it as cuda:0; "
            "use model.device=cuda or auto and let federated.flower.simulation.gpus_per_client place them"
        )


def simulation_device_note(cfg: RunConfig) -> str | None:
    """What a user should be told about where the actors run, when it is not what they may expect."""
    import torch

    sim = cfg.federated.flower.simulation
    if cfg.model.device != "auto" or sim.gpus_per_client > 0 or not torch.cuda.is_available():
        return None
    return (
        f"model.device=auto, but federated.flower.simulation.gpus_per_client=0: the ClientApp actors see none "
        f"of this machine's {torch.cuda.device_count()} GPU(s) and run on the CPU; give each actor a share "
        "(e.g. gpus_per_client=0.5) to run them on the GPUs"
    )


def run_simulation(
    cfg: RunConfig, num_supernodes: int | None = None, resume: bool = False, overwrite: bool = False
) -> dict:
    """A whole federated run under Flower's simulation runtime; the summary run_server returns.

    ``num_supernodes`` defaults to one virtual node per client of the config's data."""
    from ..data import prepare_data
    from .server_app import check_flower_config

    require_ray()
    check_flower_config(cfg)
    cfg = _with_absolute_paths(cfg)
    clients = len(prepare_data(cfg.data, seed=cfg.seed).clients)
    n = clients if num_supernodes is None else num_supernodes
    check_simulation_config(cfg, n, clients)
    RunDir(cfg, resume=resume, overwrite=overwrite).close()  # the ServerApp's own checks, before Ray starts

    logs = cfg.run_dir / "flower-sim"
    if not resume:
        shutil.rmtree(logs, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="fbsim-", dir=_short_tmp(), ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        app = deploy.write_app(tmp / "app", cfg, resume=resume, overwrite=overwrite)
        port = deploy.free_port()
        home = deploy.write_flwr_config(tmp / "flwr-home", f"127.0.0.1:{port}", name=CONNECTION).parent
        env = _environment(cfg, home, tmp)
        try:
            with _terminate_unwinds(), deploy.Processes(logs, env) as procs:
                link = procs.start("superlink", _superlink_args(port))
                if not _listening(port, link, timeout=60):
                    raise SimulationError(
                        f"the SuperLink did not start (exit code {link.poll()}); its log, "
                        f"{logs / 'superlink.log'}, ends:\n{ANSI.sub('', procs.log('superlink'))[-3000:]}"
                    )
                flwr_run = procs.start("flwr-run", _flwr_run_args(cfg, app, n))
                flwr_run.wait()
                status = _run_status(procs.env)
        finally:
            _end_leftovers(env[MARKER])
    if status.get("status") != "finished:completed":
        log = logs / "flwr-run.log"
        tail = ANSI.sub("", log.read_text(errors="replace"))[-3000:] if log.is_file() else ""
        raise SimulationError(
            f"the simulation ended {status.get('status', 'without a status')}: "
            f"{status.get('status-details', '')} (Flower's log: {log})\n{tail}"
        )
    return _summary(cfg)


# ------------------------------------------------------------------------------------ pieces
def _with_absolute_paths(cfg: RunConfig) -> RunConfig:
    # The ServerApp runs in a process the SuperLink starts; it must find the same folders from anywhere.
    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    if cfg.data.root and not Path(cfg.data.root).is_absolute():
        cfg.data.root = str(Path(cfg.data.root).resolve())
    return cfg


def _short_tmp() -> str | None:
    # Ray puts Unix sockets under its temp folder; a socket path must stay under 107 bytes.
    return "/tmp" if os.path.isdir("/tmp") else None


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own Flower, even when it is not on PATH
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SimulationError(f"`{name}` (installed with flwr) is not beside {sys.executable} nor on PATH")
    return found


def _environment(cfg: RunConfig, home: Path, tmp: Path) -> dict[str, str]:
    sim = cfg.federated.flower.simulation
    src = Path(__file__).resolve().parents[2]  # this fedbiscuit's source folder, also when not installed
    paths = [os.environ.get("PYTHONPATH", "")]
    if src.name not in ("site-packages", "dist-packages"):  # never put site-packages before the stdlib
        paths.insert(0, str(src))
    return {
        MARKER: str(tmp),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",  # Flower would post usage events; the simulation runs offline
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_TMPDIR": str(tmp),  # Ray's session folder (sockets, logs) goes with the temp folder
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(sim.object_store_mb * 10**6),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        # the SuperLink starts flower-superexec and flwr-simulation by name: this environment's Flower
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def _superlink_args(port: int) -> list[str]:
    return [
        _executable("flower-superlink"),
        "--insecure",  # loopback only: nothing leaves this machine
        "--simulation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # every process here already has fedbiscuit; the app folder lists no dependencies on purpose
        "--disable-runtime-dependency-installation",
    ]


def _flwr_run_args(cfg: RunConfig, app: Path, num_supernodes: int) -> list[str]:
    sim = cfg.federated.flower.simulation
    federation = {
        "num-supernodes": num_supernodes,
        "client-resources-num-cpus": sim.cpus_per_client,  # whole cores (uint32 in Flower 1.41)
        "client-resources-num-gpus": float(sim.gpus_per_client),
        "init-args-logging-level": '"warning"',
    }
    if sim.num_cpus is not None:
        federation["init-args-num-cpus"] = sim.num_cpus
    args = [_executable("flwr"), "run", str(app), CONNECTION, "--stream"]
    for key, value in federation.items():
        args += ["--federation-config", f"{key}={value}"]
    return args


def _listening(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def _run_status(env: dict[str, str]) -> dict:
    """The run's row in `flwr ls` (a fresh in-memory SuperLink holds exactly this one run)."""
    out = subprocess.run(
        [_executable("flwr"), "ls", CONNECTION, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return {"status": "unknown", "status-details": f"`flwr ls` said: {out.stdout}{out.stderr}"[:2000]}
    return runs[0] if runs else {"status": "not started"}


@contextlib.contextmanager
def _terminate_unwinds():
    """SIGTERM (a scheduler, `timeout`, `kill`) unwinds the stack as Ctrl-C does, so the processes started
    here are stopped on the way out: they run in their own sessions, and nothing else would end them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def unwind(signum, frame):
        raise SystemExit(128 + signum)

    # SIGHUP too: a closed terminal must not orphan the SuperLink and Ray (they run in their own sessions)
    signals = [
        s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None
    ]  # no SIGHUP on Windows
    previous = {sig: signal.signal(sig, unwind) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_leftovers(marker: str) -> None:
    """SIGKILL any process that still carries this simulation's marker (Linux; a no-op elsewhere).

    Processes.stop_all already ended the SuperLink's whole process tree; this catches a Ray process that was
    re-parented away from it (e.g. when the simulation process died before Ray shut down)."""
    needle = f"{MARKER}={marker}".encode()
    for pid in _marked(needle):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _marked(needle: bytes) -> list[int]:
    out = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and deploy._alive(int(entry.name)):
                out.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return out


@dataclass
class _FinishedRun:
    """What the summary reads of a run folder the ServerApp (another process) has written."""

    path: Path

    def records(self) -> list[dict]:
        return read_records(self.path / "metrics.jsonl")


def _summary(cfg: RunConfig) -> dict:
    from ..federated.checkpoint import list_checkpoints, load_checkpoint
    from ..pipeline import federated_summary

    checkpoints = list_checkpoints(cfg.run_dir / "checkpoints")
    if not checkpoints:
        raise SimulationError(f"the simulation completed but left no checkpoint in {cfg.run_dir}")
    return federated_summary(_FinishedRun(cfg.run_dir), load_checkpoint(checkpoints[-1]))
