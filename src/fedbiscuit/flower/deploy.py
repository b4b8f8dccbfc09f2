"""Deployment on real machines: the Flower app folder, certificates and keys, and the Flower commands.

- ``write_app``: a Flower app folder (pyproject.toml only) whose ServerApp and ClientApp are the installed
  fedbiscuit package's, carrying the resolved run config. Its dependency list is empty on purpose: the
  SuperLink would otherwise install it at run time with uv, and a listed torch pulls CUDA wheels.
- ``make_certificates`` / ``make_node_key``: a CA, a server certificate for the SuperLink's host names, and
  per-SuperNode EC P-384 key pairs (OpenSSH format, what flower-supernode and `flwr supernode register` read).
- ``superlink_args`` / ``supernode_args`` / ``write_flwr_config``: the exact commands and the Flower CLI
  connection; README's deployment guide prints the same.
- ``Processes``: starts each command in its own process group and stops every one of them on exit.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..config import RunConfig, dump_config

APP_NAME = "fedbiscuit-flower"


def _toml_string(text: str) -> str:
    # a TOML literal multi-line string keeps the YAML byte for byte (no escapes); YAML never holds '''
    if "'''" in text:
        raise ValueError("the config contains ''' which a TOML literal string cannot hold")
    return "'''\n" + text + "'''"


def write_app(folder: Path, cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = f"""# A Flower app whose ServerApp and ClientApp come from the installed fedbiscuit package.
# Written by `fedbiscuit flower-app`; run it with `flwr run {folder.name} <connection>`.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "FedBis / FedBiscuit selector training ({cfg.name})"
license = "Apache-2.0"
# Empty on purpose: every machine has fedbiscuit installed; run-time installation must stay disabled.
dependencies = []

[tool.flwr.app]
publisher = "fedbiscuit"

[tool.flwr.app.components]
serverapp = "fedbiscuit.flower.server_app:app"
clientapp = "fedbiscuit.flower.client_app:app"

[tool.flwr.app.config]
resume = {str(resume).lower()}
overwrite = {str(overwrite).lower()}
fedbiscuit-config = {_toml_string(dump_config(cfg))}
"""
    (folder / "pyproject.toml").write_text(text)
    return folder


def write_flwr_config(
    flwr_home: Path, address: str, ca: Path | None = None, name: str = "fedbiscuit"
) -> Path:
    """$FLWR_HOME/config.toml with one SuperLink connection (TLS when ``ca`` is given)."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{Path(ca).resolve()}"' if ca else "insecure = true"
    text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    path = flwr_home / "config.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ certificates
def make_certificates(folder: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """ca.crt (+ ca.key), server.pem + server.key for the SuperLink, valid for ``hosts`` (names or IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fedbiscuit CA"))
        .issuer_name(name("fedbiscuit CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {
        "ca": folder / "ca.crt",
        "ca_key": folder / "ca.key",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    for path, k in ((paths["ca_key"], ca_key), (paths["key"], key)):
        path.write_bytes(
            k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        path.chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for SuperNode authentication: (private key for the node, public key to register)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


# ------------------------------------------------------------------------------------ commands
def superlink_args(
    port: int,
    host: str = "0.0.0.0",
    certs: dict | None = None,
    auth: bool = False,
    database: Path | None = None,
) -> list[str]:
    args = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if certs:
        args += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"])]
        args += ["--ssl-keyfile", str(certs["key"])]
    else:
        args.append("--insecure")
    if auth:
        args.append("--enable-supernode-auth")
    if database:
        args += ["--database", str(database)]  # the SuperLink's state survives its own restart
    return args


def node_config_string(config: dict) -> str:
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in config.items())


def supernode_args(
    superlink: str,
    node_config: dict,
    runtime_port: int = 9094,
    ca: Path | None = None,
    key: Path | None = None,
) -> list[str]:
    args = ["flower-supernode", "--superlink", superlink, "--port", str(runtime_port)]
    args += ["--node-config", node_config_string(node_config)]
    args += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key:
        args += ["--auth-supernode-private-key", str(key)]
    return args


# ------------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


class Processes:
    """Commands started in their own process groups; ``stop_all`` (also on exit) ends every group."""

    def __init__(self, logs: Path, env: dict | None = None):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Signal the process's group and every descendant (Flower starts some helpers in new sessions)."""
        proc = self.procs.pop(name)
        family = descendants(proc.pid)
        _signal_group(proc.pid, sig)
        for pid in family:
            _signal(pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while (alive := [p for p in family if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            _signal(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM, timeout=10.0)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
