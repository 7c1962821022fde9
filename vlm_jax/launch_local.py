"""Runs a ``vlm-jax`` command as several JAX processes on this machine (multi-host rehearsal).

    python -m vlm_jax.launch_local --num_processes 2 --devices_per_process 4 -- \\
        train --config experiments/clip_tiny.py:test --workdir runs/mh

starts ``python -m vlm_jax.main <command> ... --coordinator_address 127.0.0.1:<port>
--num_processes N --process_id i`` for ``i = 0..N-1``, each with its own
``--xla_force_host_platform_device_count`` CPU devices, connected by ``jax.distributed`` and
gloo collectives exactly as the hosts of a TPU pod are. Each process loads only its share of
every batch; process 0 writes logs; all take part in checkpointing. Output lines are prefixed
with ``[p<i>]``; the launcher first prints ``[launch_local] process <i>: pid <pid>`` for each, so
that a signal can be sent to one process alone (``kill -TERM <pid>``: a preemption of one host).

SIGINT/SIGTERM sent to the launcher (Ctrl-C) are forwarded once to every process (a preemption of
all hosts); the processes run in their own session, so a terminal's Ctrl-C reaches them only
through the launcher. If one process fails, the others get ``grace`` seconds to stop on their own
(vlm-jax agrees on stop decisions, so they fail with the same error within seconds); any still
running then are killed, as a dead host's peers would otherwise wait in a collective. The exit
code is the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str, sink) -> None:
    for line in proc.stdout:
        sink.write(f"{prefix}{line}")
        sink.flush()


def launch(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 4,
           port: int | None = None, env: dict | None = None, timeout: float | None = None,
           sink=None, grace: float = 30.0) -> int:
    """Runs ``vlm-jax <command>`` as ``num_processes`` local processes; returns the exit code.

    ``grace``: seconds the others may take to stop after one process failed, before being
    killed."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be >= 1.")
    port = port or _free_port()
    sink = sink or sys.stdout
    base = dict(os.environ if env is None else env)
    base["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in base.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    base["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    procs, pumps = [], []
    for i in range(num_processes):
        cmd = [sys.executable, "-u", "-m", "vlm_jax.main", *command,
               "--coordinator_address", f"127.0.0.1:{port}",
               "--num_processes", str(num_processes), "--process_id", str(i)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=base, start_new_session=True)
        procs.append(proc)
        sink.write(f"[launch_local] process {i}: pid {proc.pid}\n")
        sink.flush()
        t = threading.Thread(target=_pump, args=(proc, f"[p{i}] ", sink), daemon=True)
        t.start()
        pumps.append(t)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        remaining = list(procs)
        deadline = None if timeout is None else time.monotonic() + timeout
        kill_at = None
        while remaining:
            for p in list(remaining):
                try:
                    rc = p.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                remaining.remove(p)
                sink.write(f"[launch_local] process {procs.index(p)} exited with code {rc}\n")
                sink.flush()
                if rc != 0 and code == 0:
                    code = rc
                    kill_at = time.monotonic() + grace
            if kill_at is not None and remaining and time.monotonic() > kill_at:
                sink.write(f"[launch_local] killing {len(remaining)} process(es) still running "
                           f"{grace:.0f} s after one failed\n")
                for p in remaining:  # A dead peer would leave them waiting in a collective.
                    p.kill()
            if deadline is not None and time.monotonic() > deadline:
                for p in remaining:
                    p.kill()
                code = code or 124
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
        for t in pumps:
            t.join(timeout=5)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_jax.launch_local",
        description="Run a vlm-jax command as N local JAX processes (gloo collectives).",
        epilog="Everything after '--' is the vlm-jax command, e.g. "
               "-- train --config experiments/clip_tiny.py:test --workdir runs/mh")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4,
                        help="CPU devices per process (the global mesh spans all of them)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before killing all")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the others may take to stop after one process failed")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1:]
    else:
        own, command = [], argv
    args, rest = parser.parse_known_args(own)
    command = rest + command
    if not command:
        parser.error("no vlm-jax command given (e.g. -- train --config ... --workdir ...)")
    return launch(command, args.num_processes, args.devices_per_process, args.port,
                  timeout=args.timeout, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
