"""The fault battery: each fault a production run meets, caused for real on ``vlm-jax train``.

    python -m tests.reliability.battery [--markdown docs/reliability.md] [--seed 0]

runs every fault end to end (subprocesses of the real command on the ``clip_tiny.py:test``
config, CPU devices, 1 or 2 local processes) and prints a table: fault, survived, steps lost,
data lost. ``tests/reliability/test_battery.py`` runs the same scenarios under pytest.

What the columns mean:

* **survived**: the run either carried on by itself or stopped with a clear message (exit code
  and the expected text), and the same command afterwards completed the run;
* **steps lost**: training steps done before the fault that had to be computed again (the steps
  since the last complete checkpoint), or updates dropped (a skipped non-finite step);
* **data lost**: checkpoints or files written before the fault that are gone or changed, and
  whether the resumed run's per-step losses equal (bitwise, one process; within 1e-5 where the
  mesh or the process count differs) those of an uninterrupted run, which holds only if it saw
  exactly the same batches in the same state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments" / "clip_tiny.py") + ":test"
TOTAL = 16
EVERY = 4


@dataclasses.dataclass
class Row:
    """One fault's outcome."""

    fault: str
    survived: bool
    steps_lost: int | None
    data_lost: str  # "none" or what was lost
    detail: str = ""
    checks: dict = dataclasses.field(default_factory=dict)  # named booleans, all must be True

    @property
    def ok(self) -> bool:
        return self.survived and self.data_lost == "none" and all(self.checks.values())


class Battery:
    """Runs the faults in a scratch directory; one uninterrupted reference run is shared."""

    def __init__(self, root: pathlib.Path, data_dir: str, seed: int = 0):
        self.root, self.data_dir = pathlib.Path(root), data_dir
        self.rng = random.Random(seed)
        self._ref: dict[int, dict[int, float]] = {}

    # -- running the command ----------------------------------------------------------------

    def args(self, workdir, *extra, total=TOTAL, every=EVERY):
        return ["train", "--config", CONFIG, "--workdir", str(workdir),
                f"--config.data.data_dir={self.data_dir}", f"--config.total_steps={total}",
                f"--config.checkpoint.every_steps={every}", "--config.log_every_steps=1",
                *extra]

    @staticmethod
    def env(devices: int = 1, faults: str = "") -> dict:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        env.pop("VLM_JAX_FAULTS", None)
        if faults:
            env["VLM_JAX_FAULTS"] = faults
        return env

    def run(self, args, devices=1, faults="", timeout=600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-u", "-m", "vlm_jax.main", *args],
                              capture_output=True, text=True, cwd=REPO, timeout=timeout,
                              env=self.env(devices, faults))

    def start(self, args, devices=1, faults="", launcher_processes=0) -> subprocess.Popen:
        if launcher_processes:
            cmd = [sys.executable, "-u", "-m", "vlm_jax.launch_local", "--num_processes",
                   str(launcher_processes), "--devices_per_process", str(devices), "--", *args]
        else:
            cmd = [sys.executable, "-u", "-m", "vlm_jax.main", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env=self.env(devices, faults))

    @staticmethod
    def wait_for_step(proc: subprocess.Popen, workdir: pathlib.Path, step: int,
                      timeout: float = 300) -> int:
        """Polls metrics.jsonl until ``step`` is logged; returns the newest logged step."""
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            logged = losses(workdir)
            if logged and max(logged) >= step:
                return max(logged)
            time.sleep(0.02)
        raise RuntimeError(f"the run did not reach step {step} (exit {proc.poll()})")

    def reference(self, total: int = TOTAL) -> dict[int, float]:
        """Per-step losses of an uninterrupted 1-device run of ``total`` steps."""
        if total not in self._ref:
            workdir = self.root / ("reference" if total == TOTAL else f"reference{total}")
            proc = self.run(self.args(workdir, total=total))
            if proc.returncode != 0:
                raise RuntimeError(f"reference run failed:\n{proc.stderr[-3000:]}")
            self._ref[total] = losses(workdir)
        return self._ref[total]

    def compare(self, workdir, after: int, exact=True, ref=None) -> str:
        """'none' if the losses of steps > after equal the reference's, else what differs."""
        ref = self.reference() if ref is None else ref
        got = losses(workdir)
        bad = [s for s in range(after + 1, max(ref) + 1)
               if s not in got or not (got[s] == ref[s] if exact else abs(got[s] - ref[s]) <= 1e-5)]
        if bad:
            s = bad[0]
            return f"losses differ from step {s}: {got.get(s)} vs {ref[s]}"
        return "none"

    # -- the faults ---------------------------------------------------------------------------

    def sigterm(self) -> Row:
        """Preemption: SIGTERM at a random step; the run saves that step and exits 0."""
        workdir = self.root / "sigterm"
        at = self.rng.randint(3, TOTAL - 4)
        proc = self.start(self.args(workdir))
        last = self.wait_for_step(proc, workdir, at)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        saved = latest_checkpoint(workdir)
        again = self.run(self.args(workdir))
        return Row(
            "SIGTERM (preemption), 1 process", proc.returncode == 0 and again.returncode == 0,
            max(0, last - (saved or 0)), self.compare(workdir, saved or 0),
            f"signal after step {last}; saved step {saved}; resumed from {resumed_from(again)}",
            {"exit 0 on SIGTERM": proc.returncode == 0, "says Preempted": "Preempted" in out,
             "resumes at the saved step": resumed_from(again) == saved,
             "saved an off-interval step or a due one": saved is not None and saved >= last})

    def sigterm_two_processes(self) -> Row:
        """Preemption of a 2-process run: both save the same step, both exit 0."""
        workdir = self.root / "sigterm2"
        # The processes agree on a step about a second after the signal: a longer run.
        total = 2 * TOTAL
        at = self.rng.randint(3, TOTAL - 4)
        proc = self.start(self.args(workdir, total=total), devices=1, launcher_processes=2)
        last = self.wait_for_step(proc, workdir, at)
        proc.send_signal(signal.SIGTERM)  # The launcher forwards it to both processes.
        out, _ = proc.communicate(timeout=300)
        saved = latest_checkpoint(workdir)
        files = sorted(p.name for p in (workdir / "checkpoints" / str(saved) / "data").iterdir()
                       ) if saved else []
        again = self.start(self.args(workdir, total=total), devices=1, launcher_processes=2)
        out2, _ = again.communicate(timeout=600)
        return Row(
            "SIGTERM (preemption), 2 processes", proc.returncode == 0 and again.returncode == 0,
            max(0, last - (saved or 0)),
            self.compare(workdir, saved or 0, exact=False, ref=self.reference(total)),
            f"signal after step {last}; both saved step {saved} ({', '.join(files)})",
            {"exit 0": proc.returncode == 0,
             "preempted before the end": "Preempted" in out and (saved or total) < total,
             "iterator state of each process": sum(f.startswith("process_") for f in files) == 2,
             "resumed": f"Resuming from checkpoint step {saved}" in out2})

    def sigkill(self) -> Row:
        """SIGKILL at a random step; the restart resumes from the last complete checkpoint."""
        workdir = self.root / "sigkill"
        at = self.rng.randint(EVERY + 1, TOTAL - 2)
        proc = self.start(self.args(workdir))
        last = self.wait_for_step(proc, workdir, at)
        proc.kill()
        proc.wait()
        complete = latest_checkpoint(workdir)  # Committed checkpoints only (no tmp dirs).
        last = max(last, max(losses(workdir)))
        again = self.run(self.args(workdir))
        start = resumed_from(again)
        return Row("SIGKILL at a random step", again.returncode == 0,
                   None if start is None else last - start,
                   self.compare(workdir, start or 0),
                   f"killed after step {last}; latest complete checkpoint {complete}; resumed "
                   f"from {start}",
                   {"resumed from the latest complete checkpoint": start == complete})

    def kill_in_save(self) -> Row:
        """SIGKILL while the async checkpoint of step 2*EVERY is being written."""
        workdir = self.root / "kill_in_save"
        step = 2 * EVERY
        # keep=10: checkpoint EVERY outlives the resumed run's saves, so it can be compared after.
        args = self.args(workdir, "--config.checkpoint.async_save=true",
                         "--config.checkpoint.keep=10")
        proc = self.run(args, faults=f"kill_in_save@{step}")
        ckpts = workdir / "checkpoints"
        partial = [p.name for p in ckpts.iterdir() if p.name.startswith(f"{step}.orbax")]
        before = digest(ckpts / str(EVERY))
        last = max(losses(workdir))
        again = self.run(args)
        start = resumed_from(again)
        after = digest(ckpts / str(EVERY))
        left = [p.name for p in ckpts.iterdir() if "orbax-checkpoint-tmp" in p.name]
        return Row(
            f"SIGKILL during the async save of step {step}", again.returncode == 0,
            None if start is None else last - start, self.compare(workdir, start or 0),
            f"killed with {partial} on disk; resumed from {start}",
            {"killed by the signal": proc.returncode == -signal.SIGKILL,
             "a partial checkpoint was left": bool(partial),
             "partial one not restored": start == EVERY,
             "partial one removed": not left and "Removing unfinished checkpoint" in again.stdout,
             "previous checkpoint untouched by the resume": before is not None and
                                                             after == before})

    def reshard(self) -> Row:
        """A checkpoint of 8 devices (data=2, fsdp=4) restored on 4 and on 1 device."""
        src = self.root / "reshard8"
        mesh8 = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]
        first = self.run(self.args(src, *mesh8, "--config.checkpoint.keep=10"), devices=8)
        ref8 = losses(src)
        results, checks = [], {"8-device run": first.returncode == 0}
        for devices, mesh in ((4, ["--config.mesh.data=1", "--config.mesh.fsdp=2",
                                   "--config.mesh.tensor=2"]),
                              (1, ["--config.mesh.data=1", "--config.mesh.fsdp=1"])):
            dst = self.root / f"reshard{devices}"
            shutil.rmtree(dst, ignore_errors=True)
            (dst / "checkpoints").mkdir(parents=True)
            shutil.copytree(src / "checkpoints" / str(EVERY), dst / "checkpoints" / str(EVERY))
            proc = self.run(self.args(dst, *mesh, "--config.checkpoint.keep=10"),
                            devices=devices)
            checks[f"resumed on {devices} device(s)"] = (
                proc.returncode == 0 and resumed_from(proc) == EVERY)
            results.append(self.compare(dst, EVERY, exact=False, ref=ref8))
        lost = [r for r in results if r != "none"]
        return Row("restore an 8-device checkpoint on 4 and 1 devices",
                   all(checks.values()), 0, lost[0] if lost else "none",
                   "data=2,fsdp=4 -> fsdp=2,tensor=2 (4 devices) and 1 device", checks)

    def nan_skip(self) -> Row:
        """A NaN loss at step 6 with guard.nonfinite=skip: the update is dropped, the run goes on."""
        workdir = self.root / "nan_skip"
        proc = self.run(self.args(workdir, "--config.guard.nonfinite=skip"), faults="nan_loss@6")
        got = losses(workdir)
        records = read_metrics(workdir)
        skipped = max((r.get("train/skipped_steps", 0) for r in records), default=0)
        ref = self.reference()
        return Row("NaN loss, guard.nonfinite=skip", proc.returncode == 0, 1,
                   "none" if all(got[s] == ref[s] for s in range(1, 6)) else "steps 1-5 differ",
                   "step 6 skipped; run completed",
                   {"step 6 reported": "step 6: non-finite train/loss=nan" in proc.stdout,
                    "counted": skipped == 1,
                    "finite afterwards": all(s in got and math.isfinite(got[s])
                                            for s in range(7, TOTAL + 1)),
                    "completed": (workdir / "eval_results_test.json").exists()})

    def nan_stop(self) -> Row:
        """A NaN loss at step 6 with guard.nonfinite=stop: exit 3, last good checkpoint kept."""
        workdir = self.root / "nan_stop"
        proc = self.run(self.args(workdir), faults="nan_loss@6")
        kept = latest_checkpoint(workdir)
        again = self.run(self.args(workdir))
        start = resumed_from(again)
        return Row("NaN loss, guard.nonfinite=stop", proc.returncode == 3 and
                   again.returncode == 0, None if start is None else 6 - start,
                   self.compare(workdir, start or 0),
                   f"stopped at step 6, checkpoint {kept} kept; restarted from {start}",
                   {"names step and metric": "Non-finite train/loss=nan" in proc.stderr and
                    "at step 6" in proc.stderr,
                    "no checkpoint after the bad step": kept == EVERY})

    def _refused(self, name: str, workdir: pathlib.Path, args, expect: str, code=2,
                 devices=1, cmd_prefix=None) -> Row:
        before = digest(workdir)
        proc = self.run(args, devices=devices)
        after = digest(workdir)
        said = [line for line in proc.stderr.splitlines() if expect in line]
        return Row(name, proc.returncode == code and expect in proc.stderr, 0,
                   "none" if before == after else "workdir changed",
                   (said or proc.stderr.strip().splitlines()[-1:] or [""])[0][:200],
                   {"clear error": expect in proc.stderr, f"exit {code}": proc.returncode == code})

    def config_changes(self) -> list[Row]:
        """Resume refused before any compute: changed model, other shapes, unwritable workdir."""
        workdir = self.root / "reference"
        self.reference()
        rows = [self._refused(
            "config changed between runs (model.embed_dim)", workdir,
            self.args(workdir, "--config.model.embed_dim=16"),
            "model.embed_dim: checkpoint 32 -> now 16")]
        # Another model evaluated on the checkpoint: the first mismatched parameter is named.
        rows.append(self._refused(
            "checkpoint shapes differ from the config", workdir,
            ["eval", "--config", CONFIG, "--workdir", str(workdir),
             f"--config.data.data_dir={self.data_dir}", "--config.model.embed_dim=16"],
            "has shape"))
        blocker = self.root / "a_file"
        blocker.write_text("not a directory")
        rows.append(self._refused("unwritable workdir", blocker, self.args(blocker / "run"),
                                  "is not writable"))
        return rows

    def disk_full(self) -> list[Row]:
        """Workdirs on a small tmpfs: too small for a checkpoint; filled up during the run."""
        rows = []
        with tmpfs(self.root / "tiny_fs", "600k") as small:
            if small is None:
                return [Row("disk full (needs `mount -t tmpfs`)", False, None, "not run",
                            "mount not permitted here")]
            rows.append(self._refused("disk too small for a checkpoint", small,
                                      self.args(small / "run"), "Not enough disk space"))
        with tmpfs(self.root / "fill_fs", "40m") as mnt, contextlib.ExitStack() as stack:
            if mnt is None:
                return rows + [Row("disk full during the run", False, None, "not run",
                                   "mount not permitted here")]
            workdir = mnt / "run"
            proc = self.start(self.args(workdir))
            stack.callback(lambda: proc.poll() is None and proc.kill())  # Before the unmount.
            while proc.poll() is None and (latest_checkpoint(workdir) or 0) < EVERY:
                time.sleep(0.02)
            if latest_checkpoint(workdir) != EVERY:  # Died first, or went past before the fill.
                out, _ = proc.communicate(timeout=300)
                return rows + [Row("disk full during the run", False, None, "not checked",
                                   f"no checkpoint {EVERY} to fill after (exit {proc.returncode}, "
                                   f"latest {latest_checkpoint(workdir)}): {out[-1500:]}")]
            before = digest(workdir / "checkpoints" / str(EVERY))
            filled = fill(mnt / "filler")
            out, _ = proc.communicate(timeout=300)
            kept = latest_checkpoint(workdir)
            intact = digest(workdir / "checkpoints" / str(kept)) == before if kept == EVERY \
                else kept is not None
            (mnt / "filler").unlink(missing_ok=True)
            logged = max(losses(workdir))
            again = self.run(self.args(workdir))
            start = resumed_from(again)
            rows.append(Row(
                "disk full during the run", proc.returncode == 2 and again.returncode == 0,
                None if start is None else logged - start,
                self.compare(workdir, start or 0) if intact else "checkpoint damaged",
                f"filled after checkpoint {EVERY} ({filled}); stopped with checkpoint {kept}; "
                f"resumed from {start}" + ("" if proc.returncode == 2 else f": {out[-1500:]}"),
                {"says disk full": "Disk full" in out or "Not enough disk space" in out,
                 "exit 2": proc.returncode == 2}))
        return rows

    def all(self) -> list[Row]:
        rows = []
        for fn in (self.sigterm, self.sigterm_two_processes, self.sigkill, self.kill_in_save,
                   self.reshard, self.nan_skip, self.nan_stop):
            rows.append(fn())
        rows += self.config_changes()
        rows += self.disk_full()
        return rows


# -- helpers -------------------------------------------------------------------------------


def read_metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # A line cut by a kill.
            out.append(json.loads(line))
    return out


def losses(workdir) -> dict[int, float]:
    """Step -> loss; a step logged twice (before a kill and after the resume) keeps the last."""
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def latest_checkpoint(workdir) -> int | None:
    d = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
    return max(steps, default=None)


def resumed_from(proc) -> int | None:
    text = proc.stdout if isinstance(proc.stdout, str) else ""
    mark = "Resuming from checkpoint step "
    return int(text.split(mark)[1].split()[0]) if mark in text else None


def digest(path) -> str | None:
    """Hash of every file's relative path and bytes under ``path`` (None if absent)."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def tmpfs(mountpoint: pathlib.Path, size: str):
    """A tmpfs of ``size`` at ``mountpoint``; yields None where mounting is not permitted.

    The mount is checked (another device than the parent directory, about ``size`` in total)
    before anything is written to it: the disk-full scenario must never fill a real disk.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    ok = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
        capture_output=True, check=False).returncode == 0
    try:
        wanted = int(size[:-1]) * {"k": 2**10, "m": 2**20}[size[-1]]
        st = os.statvfs(mountpoint)
        real = (os.stat(mountpoint).st_dev != os.stat(mountpoint.parent).st_dev
                and wanted / 2 <= st.f_blocks * st.f_frsize <= wanted * 2)
        yield mountpoint if ok and real else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def fill(path: pathlib.Path) -> str:
    """Writes ``path`` until its filesystem is full; returns how that went (for the table)."""
    written = 0
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"\0" * 2**16)
                f.flush()
                written += 2**16
    except OSError as e:  # ENOSPC: full, as wanted (also when not even the file could be made).
        st = os.statvfs(path.parent)
        return f"{written >> 20} MiB more, then {e.strerror}; {st.f_bavail * st.f_frsize} B free"


def table(rows: list[Row]) -> str:
    lines = ["| fault | survived | steps lost | data lost | what happened |",
             "|---|---|---|---|---|"]
    for r in rows:
        failed = [k for k, v in r.checks.items() if not v]
        note = r.detail + (f" (FAILED: {', '.join(failed)})" if failed else "")
        lines.append(f"| {r.fault} | {'yes' if r.survived else 'NO'} | "
                     f"{'-' if r.steps_lost is None else r.steps_lost} | {r.data_lost} | "
                     f"{note} |")
    return "\n".join(lines)


def prepare_data(root: pathlib.Path) -> str:
    from input_pipeline import shapes  # pylint: disable=import-outside-toplevel

    data_dir = root / "shapes_32px"
    shapes.prepare(data_dir, config="32px", num_train=512, num_eval=128, process_index=0,
                   progress=False)
    return str(data_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--seed", type=int, default=0, help="picks the random fault steps")
    parser.add_argument("--only", default=None, help="comma-separated method names")
    args = parser.parse_args(argv)
    root = pathlib.Path(tempfile.mkdtemp(prefix="vlm_jax_faults."))
    battery = Battery(root, prepare_data(root), seed=args.seed)
    t0 = time.time()
    if args.only:
        rows = []
        for name in args.only.split(","):
            out = getattr(battery, name)()
            rows += out if isinstance(out, list) else [out]
    else:
        rows = battery.all()
    text = table(rows)
    print(text)
    print(f"\n{sum(r.ok for r in rows)}/{len(rows)} faults survived with no data lost "
          f"({time.time() - t0:.0f} s; scratch in {root})")
    if args.markdown:
        pathlib.Path(args.markdown).write_text(text + "\n")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
