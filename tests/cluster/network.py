"""Hosts on one machine: Linux network namespaces when root, else loopback addresses.

As root, each host is a network namespace with its own address and a veth link to a bridge in
the machine's namespace, which holds the gateway address (where PostgreSQL and Redis listen):

    machine namespace                      mhvc<id>h0              mhvc<id>h1
    bridge mhvb<id>  10.X.Y.1/24 --veth--  eth0 10.X.Y.10/24       eth0 10.X.Y.11/24
                                  \\--veth-------------------------/

A host can be taken away by cutting its link (`cut`) and brought back (`restore`), and each host
resolves names from its own hosts file (``/etc/netns/<namespace>/hosts``, which ``ip netns exec``
puts in place of ``/etc/hosts``): a DNS name with one address per replica, as a Kubernetes
headless Service gives.

Without root, hosts are distinct loopback addresses (127.X.Y.10, ...): separate listeners and
connections, no link to cut, no per-host resolver.

Every name carries a random run id, so concurrent runs do not meet; `close` removes everything
and a run that died without closing is cleaned up by the next one (its owner file under
``/run/mhv-cluster`` names a process that no longer exists).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

STATE = Path("/run/mhv-cluster")
NETNS_ETC = Path("/etc/netns")
PREFIX = "mhvc"


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def namespaces_available() -> bool:
    """Whether this process may create network namespaces (root with iproute2)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


@dataclass
class Host:
    """One host: an address, how to run a command there, its link."""

    name: str
    address: str
    namespace: str | None = None
    link: str | None = None
    _ports: dict[str, int] = field(default_factory=dict)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host."""
        if self.namespace is None:
            return argv
        return ["ip", "netns", "exec", self.namespace, *argv]

    def port(self, purpose: str, default: int) -> int:
        """The port for `purpose`: `default` in a namespace of our own, else a free one."""
        if purpose not in self._ports:
            if self.namespace is not None:
                self._ports[purpose] = default
            else:
                with socket.socket() as probe:
                    probe.bind((self.address, 0))
                    self._ports[purpose] = int(probe.getsockname()[1])
        return self._ports[purpose]

    def cut(self) -> None:
        """Take the host off the network: its link goes down, its processes keep running."""
        if self.link is None:
            raise RuntimeError("loopback hosts have no link to cut")
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        """Bring the host's link back."""
        assert self.link is not None
        _ip("link", "set", self.link, "up")

    def processes(self) -> list[int]:
        """Processes running in the host's namespace (none known for a loopback host)."""
        if self.namespace is None:
            return []
        return [int(pid) for pid in _ip("netns", "pids", self.namespace, check=False).split()]


@dataclass
class Network:
    """The hosts of one run and the gateway address they reach the machine's services on."""

    run_id: str
    gateway: str
    subnet: str
    hosts: list[Host]
    namespaces: bool

    @classmethod
    def create(cls, count: int, *, namespaces: bool | None = None) -> Network:
        """Create `count` hosts: namespaces when allowed (or asked), else loopback addresses."""
        use_namespaces = namespaces_available() if namespaces is None else namespaces
        run_id = secrets.token_hex(3)
        if not use_namespaces:
            base = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}"
            hosts = [Host(f"h{k}", f"{base}.{10 + k}") for k in range(count)]
            return cls(run_id, "127.0.0.1", f"{base}.0/24", hosts, namespaces=False)
        STATE.mkdir(parents=True, exist_ok=True)
        with _locked():
            _reap_dead_runs()
            subnet = _free_subnet()
            network = cls(run_id, str(subnet.network_address + 1), str(subnet), [], True)
            (STATE / f"{run_id}.owner").write_text(str(os.getpid()))
            try:
                network._build(subnet, count)
            except BaseException:
                network.close()
                raise
        return network

    @property
    def bridge(self) -> str:
        return f"mhvb{self.run_id}"

    def _build(self, subnet: ipaddress.IPv4Network, count: int) -> None:
        prefix = subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for k in range(count):
            namespace = f"{PREFIX}{self.run_id}h{k}"
            link = f"mhvv{self.run_id}{k}"
            address = str(subnet.network_address + 10 + k)
            _ip("netns", "add", namespace)
            self.hosts.append(Host(f"h{k}", address, namespace, link))
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("link", "set", link, "master", self.bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def resolve(self, names: Mapping[str, list[str]]) -> bool:
        """Make every host resolve each name to its addresses; False when hosts cannot."""
        if not self.namespaces:
            return False
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{address} {name}" for name, addresses in names.items() for address in addresses]
        for host in self.hosts:
            assert host.namespace is not None
            folder = NETNS_ETC / host.namespace
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")
        return True

    def close(self) -> None:
        """Remove every namespace, link, hosts file and the bridge (their processes die)."""
        if self.namespaces:
            _teardown(self.run_id)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    # Choosing a subnet and claiming it with the bridge address is one step for concurrent runs.
    with (STATE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_subnet() -> ipaddress.IPv4Network:
    used = []
    for line in (_ip("-4", "-o", "addr") + _ip("-4", "route")).splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(word, strict=False))
    for _ in range(100):
        candidate = ipaddress.IPv4Network(
            f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24"
        )
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test hosts")


def _teardown(run_id: str) -> None:
    namespaces = [
        line.split()[0]
        for line in _ip("netns", "list", check=False).splitlines()
        if line.startswith(f"{PREFIX}{run_id}h")
    ]
    for namespace in namespaces:
        # A process keeps its namespace (and its address) alive after the name is gone.
        for pid in _ip("netns", "pids", namespace, check=False).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", namespace, check=False)
        shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
    _ip("link", "del", f"mhvb{run_id}", check=False)
    with contextlib.suppress(OSError):
        NETNS_ETC.rmdir()  # only when no other run has files there
    (STATE / f"{run_id}.owner").unlink(missing_ok=True)


def _reap_dead_runs() -> None:
    for owner in STATE.glob("*.owner"):
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            _teardown(owner.stem)
        except (OSError, ValueError):
            continue
