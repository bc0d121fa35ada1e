"""Where a request's time goes: ``make profile``. Never run by the test suite.

The peer benchmark's endpoint (``benchmarks/peers/``) is served by gunicorn for the bare
variant and this package's variants (lease and transaction claim modes); py-spy samples
every gunicorn worker while the client sends first requests, then replays. For each variant
and figure it writes a flame graph (``benchmarks/.profiles/<variant>-<figure>-<pid>.svg``)
and prints how the workers' sampled time inside requests (waits included) splits between
this package's code, Django and DRF, the database driver (waiting for PostgreSQL included)
and the rest, beside the bare variant's. Needs py-spy (``pip install py-spy``) and, on
Linux, ptrace rights (root, or ``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peers import load  # noqa: E402
from benchmarks.peers.servers import Server, start, stop  # noqa: E402

VARIANTS = os.environ.get(
    "PROFILE_VARIANTS", "bare,idempotency_django,idempotency_django_transaction"
).split(",")
SECONDS = int(os.environ.get("PROFILE_SECONDS", "15"))
RATE = 250  # samples per second
OUT = ROOT / "benchmarks" / ".profiles"

# A frame's file tells whose code it is; the innermost matching frame of a stack wins.
# py-spy names a frame "function (path/to/module.py:line)", the path relative to its
# site-packages (or absolute, for this checkout's editable install).
OWNERS = [
    ("idempotency_django", "idempotency_django/"),
    ("database driver", "psycopg/"),
    ("Django and DRF", "django/"),
    ("Django and DRF", "rest_framework/"),
    ("gunicorn", "gunicorn/"),
]


def _workers(server: Server) -> list[int]:
    assert server.process is not None
    children = subprocess.run(
        ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True
    ).stdout.split()
    return [int(pid) for pid in children]


def _record(pid: int, path: Path, raw: Path) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    # --idle: a worker waiting for PostgreSQL's answer is part of the request's time.
    common = ["--pid", str(pid), "--duration", str(SECONDS), "--rate", str(RATE)]
    common += ["--nonblocking", "--idle"]
    return [
        subprocess.Popen([spy, "record", *common, "-o", str(path)], stderr=subprocess.DEVNULL),
        subprocess.Popen(
            [spy, "record", *common, "--format", "raw", "-o", str(raw)], stderr=subprocess.DEVNULL
        ),
    ]


def _owner(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for owner, marker in OWNERS:
            if marker in frame:
                return owner
    return "other"


def _split(raw_files: list[Path]) -> collections.Counter[str]:
    """Samples per owner, from py-spy's collapsed stacks ("frame;frame;... count")."""
    owners: collections.Counter[str] = collections.Counter()
    for raw in raw_files:
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            # Only samples inside a request (a Django frame on the stack): not the worker
            # waiting for the next connection.
            if stack and "(django/" in stack:
                owners[_owner(stack)] += int(count)
    return owners


def _drive(server: Server, figure: str, stop_at: threading.Event) -> None:
    async def loop() -> None:
        while not stop_at.is_set():
            if figure == "first":
                await load.first_requests(server.url, server.header, 50)
            else:
                await load.replays(server.url, server.header, 50)

    asyncio.run(loop())


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    servers = [start(variant, 18300 + number) for number, variant in enumerate(VARIANTS)]
    try:
        table = []
        for server in servers:
            if server.error:
                print(f"{server.variant}: {server.error}")
                continue
            for figure in ("first", "replay"):
                done = threading.Event()
                client = threading.Thread(target=_drive, args=(server, figure, done))
                client.start()
                raws, spies = [], []
                for pid in _workers(server):
                    raw = OUT / f"{server.variant}-{figure}-{pid}.txt"
                    svg = OUT / f"{server.variant}-{figure}-{pid}.svg"
                    spies += _record(pid, svg, raw)
                    raws.append(raw)
                for spy in spies:
                    spy.wait()
                done.set()
                client.join()
                owners = _split([raw for raw in raws if raw.exists()])
                total = sum(owners.values()) or 1
                table.append((server.variant, figure, owners, total))
        names = ["idempotency_django", "Django and DRF", "database driver", "gunicorn", "other"]
        print("\n| variant | figure | samples | " + " | ".join(names) + " |")
        print("| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |")
        for variant, figure, owners, total in table:
            cells = " | ".join(f"{100 * owners[name] / total:.0f}%" for name in names)
            print(f"| {variant} | {figure} | {total} | {cells} |")
        print(f"\nFlame graphs: {OUT.relative_to(ROOT)}/")
    finally:
        for server in servers:
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
