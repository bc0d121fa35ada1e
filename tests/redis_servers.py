"""Real, throwaway Redis servers for the tests, never mocks: a standalone ``redis-server``, a
TLS one with a throwaway CA, and a Redis Cluster of 3 masters with a replica each, all on
free loopback ports, in directories of their own, without persistence.

The pytest fixtures (registered by ``pytest_plugins`` in tests/conftest.py):

* ``redis_server`` (session): one standalone server the whole run shares;
* ``redis_tls_server`` (session): the same over TLS only, ``.url`` is ``rediss://``;
* ``redis_cluster`` (session): the cluster;
* ``fresh_redis_server`` (function): a standalone server of the test's own, to kill and
  restart.

Shared servers are shared: give keys a prefix of the test's own. A test that kills or fails
over nodes of the shared cluster leaves it serving every slot again (``restart`` or
``heal``); which node is a master can change from test to test, so look masters up
(``master_for_key``) rather than remembering them.

Nothing outlives the run: the fixtures stop their servers, an atexit hook kills whatever is
left, and (where the server was started from the main thread) the kernel kills a server
whose test process died without running either (``setpriv --pdeathsig KILL``).

The redis-py clients (``client()``) are imported only when asked for, so the suite still
loads where redis-py is not installed: the tests that need it skip.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import random
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import pytest

HOST = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
OPENSSL = shutil.which("openssl")
SETPRIV = shutil.which("setpriv")

CLUSTER_SLOTS = 16384
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's bus listens on port + 10000
# Ports are drawn at random from [PORT_FLOOR, ceiling), ceiling below the kernel's ephemeral
# range where it can be: a killed server must get its port back on restart, and an
# ephemeral port can be taken in between by any outgoing connection on the machine.
PORT_FLOOR = 12000
MAX_CLUSTER_PORT = 55535  # so that its bus port (port + 10000) is a port at all
# Ports this run holds: a lock file per port, held (flock) as long as the server lives, so
# that parallel runs (two CI jobs, xdist workers) never pick the same ports, including
# ports a killed server will want back and cluster bus ports not yet bound.
PORT_LOCKS = Path(tempfile.gettempdir()) / "redis-test-ports"

T = TypeVar("T")


class RedisStartError(RuntimeError):
    """A redis-server (or the cluster) did not come up; the message has the log's tail."""


class RedisUnavailable(RedisStartError):
    """What the servers need is missing here (a binary, TLS support): the fixtures skip."""


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class _AddressInUse(RedisStartError):
    """Someone outside the port locks took the port between the bind test and the server."""


# -- the few commands the infrastructure sends: RESP2 over a socket, no client library -----


def _read_reply(stream: IO[bytes]) -> Any:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("the connection closed mid-reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisReplyError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("the connection closed mid-reply")
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        size = int(body)
        return None if size < 0 else [_read_reply(stream) for _ in range(size)]
    raise ConnectionError(f"not a RESP reply: {line!r}")


def redis_command(
    port: int,
    *args: str | bytes | int,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> Any:
    """Send one command to 127.0.0.1:``port`` on a connection of its own and return the
    reply (strings decoded, error replies raised as ``RedisReplyError``); ``OSError`` when
    the server does not answer."""
    parts = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((HOST, port), timeout=timeout) as raw:
        sock = ssl_context.wrap_socket(raw, server_hostname=HOST) if ssl_context else raw
        with sock, sock.makefile("rb") as stream:
            sock.sendall(payload)
            return _read_reply(stream)


def _info(text: str) -> dict[str, str]:
    """``INFO`` / ``CLUSTER INFO`` text as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs if not key.startswith("#")}


# -- ports ----------------------------------------------------------------------------------


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _port_range(cluster_bus: bool) -> range:
    bus = CLUSTER_BUS_OFFSET if cluster_bus else 0
    ceiling = min(_ephemeral_floor(), 65536) - bus
    if ceiling - PORT_FLOOR < 2000:  # an unusual ephemeral range: give up on avoiding it
        ceiling = 65536 - bus
    if cluster_bus:
        ceiling = min(ceiling, MAX_CLUSTER_PORT)
    return range(PORT_FLOOR, ceiling)


def _lock_port(port: int) -> int | None:
    """An fd holding ``port``'s lock, ``-1`` where the lock directory is unusable (the bind
    test alone then decides), ``None`` when another server holds it."""
    try:
        PORT_LOCKS.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):  # let other users' runs take locks there too
            PORT_LOCKS.chmod(0o1777)
        fd = os.open(PORT_LOCKS / f"{port}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)  # closing the last fd of the open file releases its flock


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port with connections in TIME_WAIT counts as taken, to be safe.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def reserve_port(cluster_bus: bool = False) -> tuple[int, list[int]]:
    """A free port (and, with ``cluster_bus``, its bus port + 10000, free too) and the fds
    of the locks that keep it this run's until they are closed."""
    choices = _port_range(cluster_bus)
    pick = random.SystemRandom()  # not ``random``: a test may seed it, in every run alike
    for _ in range(1000):
        port = pick.choice(choices)
        held: list[int] = []
        for wanted in (port, port + CLUSTER_BUS_OFFSET) if cluster_bus else (port,):
            fd = _lock_port(wanted)
            if fd is None:
                break
            held.append(fd)
            if not _bindable(wanted):
                break
        else:
            return port, held
        _unlock(held)
    raise RedisStartError(f"no free port in {choices} after 1000 tries")


# -- servers --------------------------------------------------------------------------------

_LIVE: set[RedisServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    """The safety net: whatever a fixture did not stop dies with the test process."""
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for server in leftovers:
        with contextlib.suppress(Exception):
            server.stop()


def _require(binary: str | None, name: str, why: str) -> str:
    if binary is None:
        raise RedisUnavailable(f"{name} is not installed (apt-get install {why})")
    return binary


class RedisServer:
    """``redis-server`` on a free port of 127.0.0.1, in ``directory`` (a temporary one of its
    own by default, removed by ``stop()``), without persistence, logging to
    ``directory/redis.log``. It is up (answers PING) when the constructor returns, unless
    ``start=False``. ``args`` are more ``--option value`` pairs for redis-server."""

    scheme = "redis"

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        args: Sequence[str] = (),
        cluster_bus: bool = False,
        start: bool = True,
        startup_timeout: float = 20.0,
    ) -> None:
        self.binary = _require(REDIS_SERVER, "redis-server", "redis-server")
        self._owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="redis-test-")).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_file = self.directory / "redis.log"
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self._cluster_bus = cluster_bus
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._answered = False  # once it has answered, the port is its own for good
        self._stopped = False
        self.port, self._locks = reserve_port(cluster_bus)
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._prepare()
            if start:
                self.start()
        except BaseException:
            self.stop()
            raise

    # -- what subclasses change

    def _prepare(self) -> None:
        """Files the server needs before its first start."""

    def _listen_args(self) -> list[str]:
        return ["--port", str(self.port)]

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client side's TLS context (``None``: plain TCP)."""
        return None

    def _start_error(self, message: str) -> RedisStartError:
        tail = self.log_tail(since_start=True)
        error = _AddressInUse if "Address already in use" in tail else RedisStartError
        return error(f"redis-server on port {self.port} {message}; {self.log_file} ends:\n{tail}")

    # -- the public side

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    def command_line(self) -> list[str]:
        return [
            self.binary,
            # ``--dir`` first: redis-server changes into it as it reads the option, and the
            # cluster's nodes.conf is relative to it.
            *("--dir", str(self.directory)),
            *("--bind", HOST),
            *self._listen_args(),
            *("--daemonize", "no"),
            # No persistence: a killed server comes back empty, as a cache-only Redis does.
            *("--save", ""),
            *("--appendonly", "no"),
            # Replicas (the cluster's) load the master's data from the socket rather than
            # via a dump.rdb that a restart would load (stale data) and sync at once
            # (Redis 7 waits 5 s by default for more replicas to share one transfer).
            *("--repl-diskless-sync", "yes"),
            *("--repl-diskless-sync-delay", "0"),
            *("--repl-diskless-load", "swapdb"),
            # DEBUG SLEEP and friends, for fault tests (loopback clients only).
            *("--enable-debug-command", "local"),
            *self.args,
        ]

    def start(self) -> Self:
        """Start it (again, after ``kill()``: on the same port) and wait until it answers
        PING. On failure the error has the tail of its log."""
        self._spawn()
        self._finish_start()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port is free when it returns and stays this run's
        until ``stop()``, for ``start()``."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)

    def stop(self) -> None:
        """Kill it for good: release its port and remove its directory if it made it."""
        self.kill()
        if self._stopped:
            return
        self._stopped = True
        _unlock(self._locks)
        self._locks = []
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> Any:
        """One command on a connection of its own (see ``redis_command``)."""
        return redis_command(self.port, *args, ssl_context=self.ssl_context(), timeout=timeout)

    def client(self, **options: Any) -> Any:
        """A ``redis.Redis`` client of this server (redis-py), ``options`` passed on."""
        import redis

        return redis.Redis.from_url(self.url, **{**self.client_options(), **options})

    def client_options(self) -> dict[str, Any]:
        """What a redis-py client needs besides ``url`` (the CA for TLS)."""
        return {}

    def log_tail(self, chars: int = 3000, since_start: bool = False) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(0, os.SEEK_END)
                floor = self._log_offset if since_start else 0
                log.seek(max(floor, log.tell() - chars))
                return log.read().decode(errors="replace")
        except OSError as error:
            return f"(no log: {error})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._stopped else "down"
        return f"<{type(self).__name__} {HOST}:{self.port} {state}>"

    # -- the machinery

    def _spawn(self) -> None:
        if self._stopped:
            raise RuntimeError(f"{self!r} was stopped for good")
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        command = self.command_line()
        if SETPRIV and threading.current_thread() is threading.main_thread():
            # The kernel kills the server when the thread that started it dies, even by
            # SIGKILL (where atexit does not run). Only from the main thread: a helper
            # thread's server would die with that thread.
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        with self.log_file.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- {time.strftime('%H:%M:%S')} {shlex.join(command)}\n".encode())
            log.flush()
            # stdout, not --logfile: a fatal configuration error is printed before any
            # log file is opened.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )

    def _finish_start(self) -> None:
        for attempt in range(4):
            try:
                self._await_ready()
            except _AddressInUse:
                # Only a port that has never served can be swapped for another: after
                # that, clients (and cluster peers) know it.
                if self._answered or attempt == 3:
                    raise
                _unlock(self._locks)
                self.port, self._locks = reserve_port(self._cluster_bus)
                (self.directory / "nodes.conf").unlink(missing_ok=True)  # it has the old port
                self._spawn()
            else:
                self._answered = True
                return

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            process = self._process
            if process is None:
                raise RedisStartError(f"{self!r} was killed while starting")
            code = process.poll()
            if code is not None:
                self._process = None
                raise self._start_error(f"exited with status {code} while starting")
            with contextlib.suppress(OSError, RedisReplyError):
                if self.command("PING", timeout=2) == "PONG":
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise self._start_error(f"did not answer PING in {self.startup_timeout:.0f} s")
            time.sleep(0.02)


# -- TLS ------------------------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
prompt = no
distinguished_name = dn

[dn]
CN = idempotency-django throwaway test CA

[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class Certificates:
    ca_file: str
    cert_file: str
    key_file: str


def make_certificates(directory: Path) -> Certificates:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost, made
    with the ``openssl`` CLI in ``directory``. P-256 keys: generated in milliseconds where
    RSA takes up to a second on a busy machine. Our own config file, so the system's
    openssl.cnf cannot add or clash with extensions (Python 3.13 verifies strictly: the CA
    needs its key usage, the server certificate its key identifiers)."""
    openssl = _require(OPENSSL, "the openssl CLI", "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    files = Certificates(
        ca_file=str(directory / "ca.crt"),
        cert_file=str(directory / "server.crt"),
        key_file=str(directory / "server.key"),
    )
    q = shlex.quote
    ca_key, csr = q(str(directory / "ca.key")), q(str(directory / "server.csr"))
    ca, cert, key, cnf = map(q, (files.ca_file, files.cert_file, files.key_file, str(config)))
    new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    steps = [
        f"req -x509 -config {cnf} -extensions ca {new_key} -keyout {ca_key} -out {ca} -days 7",
        f"req -new -config {cnf} -subj /CN={HOST} {new_key} -keyout {key} -out {csr}",
        f"x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -set_serial {secrets.randbits(63)}"
        f" -days 7 -extfile {cnf} -extensions server -out {cert}",
    ]
    for step in ([openssl, *shlex.split(line)] for line in steps):
        done = subprocess.run(step, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RedisStartError(f"{shlex.join(step)} failed:\n{done.stdout}{done.stderr}")
    return files


class RedisTLSServer(RedisServer):
    """``redis-server`` answering TLS only (``--port 0``) on its port, with a throwaway
    certificate; clients need ``ca_file`` (``ssl_ca_certs`` in redis-py). Clients do not
    need certificates of their own (``--tls-auth-clients no``). Raises ``RedisUnavailable``
    where redis-server was built without TLS, or openssl is missing."""

    scheme = "rediss"
    certificates: Certificates

    def _prepare(self) -> None:
        self.certificates = make_certificates(self.directory / "tls")
        # One context for every PING of the start-up wait, not a CA load per attempt.
        self._ssl_context = ssl.create_default_context(cafile=self.certificates.ca_file)

    @property
    def ca_file(self) -> str:
        return self.certificates.ca_file

    def _listen_args(self) -> list[str]:
        return [
            *("--port", "0"),
            *("--tls-port", str(self.port)),
            *("--tls-cert-file", self.certificates.cert_file),
            *("--tls-key-file", self.certificates.key_file),
            *("--tls-ca-cert-file", self.certificates.ca_file),
            *("--tls-auth-clients", "no"),
        ]

    def ssl_context(self) -> ssl.SSLContext:
        return self._ssl_context

    def client_options(self) -> dict[str, Any]:
        return {"ssl_ca_certs": self.certificates.ca_file}

    def _start_error(self, message: str) -> RedisStartError:
        error = super()._start_error(message)
        # What redis-server said, not our header line (its command line is all tls-*).
        said = self.log_tail(since_start=True).lower().splitlines()
        tail = "\n".join(line for line in said if not line.startswith("--- "))
        # A build without TLS rejects the tls-* options (7.0: "Bad directive"; builds with
        # TLS as a module that is not loaded: a missing connection type).
        unsupported = ("bad directive", "not supported", "missing implement", "not built")
        if "tls" in tail and any(words in tail for words in unsupported):
            return RedisUnavailable(f"{self.binary} was built without TLS support: {error}")
        return error


# -- the cluster ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``: what one node thinks of another."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool

    @property
    def myself(self) -> bool:
        return "myself" in self.flags

    @property
    def role(self) -> tuple[str, str | None]:
        """("master", None) or ("replica", its master's id)."""
        return ("master", None) if "master" in self.flags else ("replica", self.master_id)

    @classmethod
    def parse(cls, line: str) -> NodeView:
        fields = line.split()
        address = fields[1].split("@", 1)[0]
        return cls(
            node_id=fields[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            connected=fields[7] == "connected",
        )


# A node some other node flags so is not fully part of the cluster (``fail?`` is PFAIL).
_TROUBLE_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


class RedisCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replica(s) each on 127.0.0.1,
    made by ``redis-cli --cluster create``; up, every slot served and every replica in sync
    when the constructor returns.

    A dead master fails only its own slots (``cluster-require-full-coverage no``), and with
    ``auto_failover`` (the default) its replica takes over after the node timeout (1 s), as
    in production; without it, the slots stay down until ``restart`` (or ``failover``). A
    node restarts empty (no persistence) with its identity (nodes.conf), so a restarted
    master that no replica replaced takes its replicas' data down with it, as a real
    Redis without persistence would."""

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        masters: int = 3,
        replicas: int = 1,
        auto_failover: bool = True,
        node_timeout_ms: int = 1000,
        startup_timeout: float = 60.0,
    ) -> None:
        self.redis_cli = _require(REDIS_CLI, "redis-cli", "redis-tools")
        _require(REDIS_SERVER, "redis-server", "redis-server")
        self._owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="redis-cluster-")).resolve()
        self.replicas_per_master = replicas
        self.auto_failover = auto_failover
        self.nodes: list[RedisServer] = []
        self._ids: dict[int, str] = {}
        args = [
            *("--cluster-enabled", "yes"),
            *("--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(node_timeout_ms)),
            *("--cluster-require-full-coverage", "no"),
            *("--cluster-replica-no-failover", "no" if auto_failover else "yes"),
            # A replica takes over however long its link was down: a busy machine must not
            # leave slots unserved because a replica judged its data too old.
            *("--cluster-replica-validity-factor", "0"),
        ]
        try:
            for number in range(masters * (1 + replicas)):
                node = RedisServer(
                    self.directory / f"node-{number}",
                    args=args,
                    cluster_bus=True,
                    start=False,
                    startup_timeout=startup_timeout,
                )
                self.nodes.append(node)
            # All at once: their start-ups overlap instead of adding up.
            for node in self.nodes:
                node._spawn()
            for node in self.nodes:
                node._finish_start()
            self._create(startup_timeout)
            self._ids = {node.port: str(node.command("CLUSTER", "MYID")) for node in self.nodes}
            self.wait_ok(timeout=startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _create(self, timeout: float) -> None:
        command = [
            self.redis_cli,
            *("--cluster", "create"),
            *(f"{HOST}:{node.port}" for node in self.nodes),
            *("--cluster-replicas", str(self.replicas_per_master)),
            "--cluster-yes",
        ]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            raise RedisStartError(f"{shlex.join(command)} took over {timeout:.0f} s") from expired
        (self.directory / "create.log").write_text(output)
        if done.returncode != 0 or f"All {CLUSTER_SLOTS} slots covered" not in output:
            raise RedisStartError(f"{shlex.join(command)} failed:\n{output[-3000:]}")

    # -- where things are

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """Every node's (host, port), for ``redis.cluster.ClusterNode(host, port)``."""
        return [(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://`` of a master that is up now (``redis.RedisCluster.from_url``)."""
        live = self._live()
        masters = [node for node in self.masters() if node.running] if live else []
        return (masters or live or self.nodes)[0].url

    def node_id(self, node: RedisServer) -> str:
        return self._ids[node.port]

    def node(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise LookupError(f"no node of this cluster listens on {port}")

    def masters(self) -> list[RedisServer]:
        """The nodes serving slots now (in slot order), as a live node sees it; a master
        killed a moment ago is among them until its replica takes over."""
        ports = dict.fromkeys(port for _, _, port in self._slot_map(self._any_live()))
        return [self.node(port) for port in ports]

    def replicas(self) -> list[RedisServer]:
        masters = self.masters()
        return [node for node in self.nodes if node not in masters]

    def master_for_key(self, key: str | bytes) -> RedisServer:
        """The node serving ``key``'s slot (``CLUSTER KEYSLOT``, then ``CLUSTER SLOTS``)."""
        via = self._any_live()
        slot = int(via.command("CLUSTER", "KEYSLOT", key))
        for first, last, port in self._slot_map(via):
            if first <= slot <= last:
                return self.node(port)
        raise LookupError(f"no node serves slot {slot} (of {key!r})")

    def replica_of(self, master: RedisServer) -> RedisServer:
        """``master``'s replica (a running one if it has several)."""
        master_id = self.node_id(master)
        mine = [
            self.node(view.port)
            for view in self._views(self._any_live(prefer=master))
            if view.master_id == master_id and "slave" in view.flags
        ]
        if not mine:
            raise LookupError(f"{master!r} has no replica")
        return sorted(mine, key=lambda node: not node.running)[0]

    def client(self, node: RedisServer | None = None, **options: Any) -> Any:
        """A redis-py client: ``redis.Redis`` of ``node`` (for ``WAIT``, ``ROLE``...), or
        ``redis.RedisCluster`` of the cluster when no node is given."""
        if node is not None:
            return node.client(**options)
        import redis

        return redis.RedisCluster.from_url(self.url, **options)

    # -- faults

    def kill(self, node: RedisServer) -> None:
        """SIGKILL ``node``; its port stays reserved for ``restart``."""
        node.kill()

    def restart(self, node: RedisServer, timeout: float = 30.0, wait: bool = True) -> None:
        """Start a killed ``node`` again on its port, with its identity; then (``wait``)
        until the cluster is ok. A master some replica replaced comes back as a replica."""
        if not node.running:
            node.start()
        if wait:
            self.wait_ok(timeout)

    def failover(self, node: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Promote a replica (``node``, or ``node``'s replica when it is a master) with
        ``CLUSTER FAILOVER`` (``FORCE`` when its master is down), and wait until it reports
        role master and the cluster is ok; return it. A manual failover waits for the
        replica to have every write of the master first: nothing acknowledged is lost."""
        views = {view.port: view for view in self._views(self._any_live(prefer=node))}
        replica = node if "slave" in views[node.port].flags else self.replica_of(node)
        master_id = views[replica.port].master_id
        master = next((n for n in self.nodes if self._ids[n.port] == master_id), None)
        force = ["FORCE"] if master is None or not master.running else []
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, RedisReplyError):
                replica.command("CLUSTER", "FAILOVER", *force)
            # A manual failover gives up after 5 s (a busy machine, a lagging replica):
            # ask again rather than wait forever.
            attempt = min(deadline, time.monotonic() + 6)
            while time.monotonic() < attempt:
                with contextlib.suppress(OSError, RedisReplyError):
                    if replica.command("ROLE")[0] == "master":
                        self.wait_ok(max(1.0, deadline - time.monotonic()))
                        return replica
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{replica!r} was not promoted in {timeout:.0f} s")

    def wait_replicated(self, master: RedisServer, timeout: float = 10.0) -> None:
        """Until every running replica of ``master`` has applied every write ``master`` took
        so far, whichever connection made it (by replication offsets; ``WAIT`` counts the
        writes of its own connection only: on a fresh connection it returns at once)."""
        target = int(_info(master.command("INFO", "replication"))["master_repl_offset"])
        master_id = self.node_id(master)
        deadline = time.monotonic() + timeout
        while True:
            behind = []
            for view in self._views(master):
                replica = self.node(view.port)
                if view.master_id != master_id or not replica.running:
                    continue
                with contextlib.suppress(OSError, RedisReplyError):
                    info = _info(replica.command("INFO", "replication"))
                    applied = int(info.get("slave_repl_offset", -1))
                    if info.get("master_link_status") == "up" and applied >= target:
                        continue
                behind.append(replica)
            if not behind:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{behind} did not replicate {master!r} in {timeout} s")
            time.sleep(0.02)

    def heal(self, timeout: float = 30.0) -> None:
        """Restart every killed node and wait until the cluster is ok: for a test's cleanup."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_ok(timeout)

    # -- health

    def problems(self) -> list[str]:
        """Why the cluster is not ok, from every running node's point of view; ``[]``: every
        running node says ``cluster_state:ok`` with all 16384 slots ok, they agree on who
        serves which slots, those masters are running, no running node is flagged failing
        by another, and every running replica is in sync with its master."""
        live = self._live()
        if not live:
            return ["no node is running"]
        live_ports = {node.port for node in live}
        problems: list[str] = []
        slot_maps: dict[int, tuple[tuple[int, int, int], ...]] = {}
        seen: dict[int, list[NodeView]] = {}  # port -> what that node says of each node
        for node in live:
            try:
                info = _info(node.command("CLUSTER", "INFO"))
                views = seen[node.port] = self._views(node)
                slot_maps[node.port] = tuple(self._slot_map(node))
                replication = _info(node.command("INFO", "replication"))
            except (OSError, RedisReplyError) as error:
                problems.append(f"{node.port} does not answer: {error}")
                continue
            if info.get("cluster_state") != "ok":
                problems.append(f"{node.port} says cluster_state:{info.get('cluster_state')}")
            if info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                problems.append(f"{node.port} says cluster_slots_ok:{info.get('cluster_slots_ok')}")
            for view in views:
                if view.port in live_ports and view.flags & _TROUBLE_FLAGS:
                    problems.append(f"{node.port} flags {view.port} {','.join(view.flags)}")
            unknown = live_ports - {view.port for view in views}
            if unknown:
                problems.append(f"{node.port} does not know {sorted(unknown)}")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                problems.append(f"replica {node.port} is not in sync with its master")
            for first, last, port in slot_maps[node.port]:
                if port not in live_ports:
                    problems.append(f"{node.port}: {port}, which is down, serves {first}-{last}")
        if len(set(slot_maps.values())) > 1:
            problems.append(f"the nodes disagree on who serves which slots: {slot_maps}")
        # After a failover the others learn by gossip that the old master now replicates
        # the new one: until they do, replica_of() would depend on whom it asks.
        claims = {port: view.role for port, views in seen.items() for view in views if view.myself}
        for port, views in seen.items():
            for view in views:
                claim = claims.get(view.port)
                if not view.myself and claim is not None and view.role != claim:
                    problems.append(f"{port} takes {view.port} for {view.role}, not {claim}")
        return problems

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until ``problems()`` is empty; ``TimeoutError`` with the problems otherwise."""
        deadline = time.monotonic() + timeout
        while problems := self.problems():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster is not ok after {timeout:.0f} s: {problems}")
            time.sleep(0.05)

    def wait_failed(self, node: RedisServer, timeout: float = 30.0) -> None:
        """Until every other running node flags ``node`` as failed (FAIL, not just PFAIL):
        the cluster has noticed it is gone."""
        node_id = self.node_id(node)
        deadline = time.monotonic() + timeout
        while True:
            seen = []
            for other in self._live():
                if other is not node:
                    with contextlib.suppress(OSError, RedisReplyError):
                        views = {view.node_id: view for view in self._views(other)}
                        seen.append("fail" in views[node_id].flags)
            if seen and all(seen):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not flag {node!r} failed in {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the machinery

    def _live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running]

    def _any_live(self, prefer: RedisServer | None = None) -> RedisServer:
        if prefer is not None and prefer.running:
            return prefer
        live = self._live()
        if not live:
            raise RedisStartError("no node of the cluster is running")
        return live[0]

    def _views(self, via: RedisServer) -> list[NodeView]:
        text = via.command("CLUSTER", "NODES")
        return [NodeView.parse(line) for line in text.splitlines() if line.strip()]

    def _slot_map(self, via: RedisServer) -> list[tuple[int, int, int]]:
        """(first slot, last slot, port of the master) for every range, in slot order."""
        ranges = via.command("CLUSTER", "SLOTS")
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in ranges)


# -- fixtures -------------------------------------------------------------------------------


def _or_skip(make: Callable[[], T]) -> T:
    try:
        return make()
    except RedisUnavailable as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One standalone Redis the whole run shares (``.url``, ``.port``); do not kill it."""
    directory = tmp_path_factory.mktemp("redis-server")  # kept by pytest, logs included
    with _or_skip(lambda: RedisServer(directory)) as server:
        yield server


@pytest.fixture(scope="session")
def redis_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTLSServer]:
    """One TLS-only Redis the whole run shares: ``.url`` (``rediss://``), ``.ca_file``."""
    directory = tmp_path_factory.mktemp("redis-tls-server")
    with _or_skip(lambda: RedisTLSServer(directory)) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One Redis Cluster (3 masters, 1 replica each) the whole run shares."""
    directory = tmp_path_factory.mktemp("redis-cluster")
    with _or_skip(lambda: RedisCluster(directory)) as cluster:
        yield cluster


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A standalone Redis of the test's own: kill it, restart it, fill it."""
    with _or_skip(lambda: RedisServer(tmp_path / "redis")) as server:
        yield server
