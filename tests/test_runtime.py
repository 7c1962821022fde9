"""Whether and how ``vlm-jax`` starts ``jax.distributed``, for each kind of machine.

Each case sets the environment variables that cluster sets and, for Cloud TPU VMs, serves the
metadata server's answers (there is no metadata server here): the only two things replaced are
``cloud_tpu_cluster.get_metadata`` (the HTTP query) and ``running_in_cloud_tpu_vm`` (jax sets it
at import when libtpu and TPU chips are present). jax's own cluster classes take the decision;
``jax.distributed`` is never touched.
"""
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from jax._src.clusters import cloud_tpu_cluster

from vlm_jax import runtime
from vlm_jax.config import ConfigError

# Every variable a jax ClusterEnv (jax 0.10.2) reads to decide that it is present.
CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
    "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
    "TPU_SKIP_MDS_QUERY", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
    "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "PMIX_SERVER_URI", "KUBERNETES_SERVICE_HOST")


@pytest.fixture
def machine(monkeypatch):
    """Returns ``set(tpu_vm=bool, metadata=dict|None, **env)``: a clean environment first."""
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    queried = []

    def configure(tpu_vm=False, metadata=None, **env):
        monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", tpu_vm)
        for k, v in env.items():
            monkeypatch.setenv(k, v)

        def get_metadata(key):  # The GCE metadata server's /instance/attributes/<key>.
            queried.append(key)
            if metadata is None:
                raise AssertionError(f"metadata server queried for {key!r} on a machine "
                                     "that has none")
            if key in metadata:
                return metadata[key], 200
            return "", 404

        monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", get_metadata)
        return queried

    return configure


def test_laptop_is_one_process_without_runtime(machine):
    machine()
    plan = runtime.plan_distributed()
    assert plan == runtime.DistributedPlan(False, "single")
    assert "single process" in plan.describe()


def test_single_host_tpu_vm_is_one_process(machine):
    # A v5e-8 / v4-8: the metadata server names one worker, this one.
    machine(tpu_vm=True, metadata={"agent-worker-number": "0", "worker-network-endpoints": "w-0",
                                   "tpu-env": "ACCELERATOR_TYPE: 'v4-8'\n"})
    plan = runtime.plan_distributed()
    assert (plan.initialize, plan.source, plan.cluster) == (False, "cluster", "gcetpu")
    assert (plan.num_processes, plan.process_id) == (1, 0)


def test_single_slice_tpu_vm_pod(machine):
    # gcloud compute tpus tpu-vm ssh --worker=all on a v4-32: 4 hosts, this is worker 2; no
    # environment variable at all, everything comes from the metadata server.
    queried = machine(tpu_vm=True, metadata={
        "agent-worker-number": "2",
        "worker-network-endpoints": "t1v-n-0:0:10.0.0.2,t1v-n-1:1:10.0.0.3,t1v-n-2:2:10.0.0.4,"
                                    "t1v-n-3:3:10.0.0.5",
        "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\nWORKER_ID: '2'\n"})
    plan = runtime.plan_distributed()
    assert plan == runtime.DistributedPlan(True, "cluster", "gcetpu", None, 4, 2)
    assert "agent-worker-number" in queried


def test_multislice_tpu_vm(machine):
    # Two v4-32 slices (queued resources): MEGASCALE_* in the environment, workers per slice
    # from the metadata server. Process id = id in slice + slice id * hosts per slice.
    machine(tpu_vm=True, metadata={"agent-worker-number": "1",
                                   "worker-network-endpoints": "h0,h1,h2,h3", "tpu-env": ""},
            MEGASCALE_COORDINATOR_ADDRESS="10.0.0.2:8080", MEGASCALE_NUM_SLICES="2",
            MEGASCALE_SLICE_ID="1")
    plan = runtime.plan_distributed()
    assert plan == runtime.DistributedPlan(True, "cluster", "gcetpu", None, 8, 5)


def test_multislice_from_metadata_tpu_env(machine):
    # The same, with MEGASCALE_* only in the metadata's tpu-env (as on a queued-resource VM
    # before the environment is exported).
    machine(tpu_vm=True, metadata={
        "agent-worker-number": "3", "worker-network-endpoints": "h0,h1,h2,h3",
        "tpu-env": "MEGASCALE_NUM_SLICES: '4'\nMEGASCALE_SLICE_ID: '2'\n"})
    plan = runtime.plan_distributed()
    assert (plan.initialize, plan.num_processes, plan.process_id) == (True, 16, 11)


def test_gke_tpu_pod(machine):
    # GKE's TPU webhook sets these; the worker list and id come from them, not from the metadata
    # server (jax only asks it for MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID when those are not
    # in the environment).
    queried = machine(tpu_vm=True, metadata={},
                      TPU_WORKER_HOSTNAMES="job-0-0.svc,job-0-1.svc,job-0-2.svc,job-0-3.svc",
                      TPU_WORKER_ID="3", TPU_SKIP_MDS_QUERY="true")
    plan = runtime.plan_distributed()
    assert plan == runtime.DistributedPlan(True, "cluster", "gketpu", None, 4, 3)
    assert set(queried) <= {"tpu-env"}


def test_gke_multislice(machine):
    machine(tpu_vm=True, metadata={}, TPU_WORKER_HOSTNAMES="a,b", TPU_WORKER_ID="0",
            TPU_SKIP_MDS_QUERY="true", MEGASCALE_COORDINATOR_ADDRESS="a:8080",
            MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1")
    plan = runtime.plan_distributed()
    assert plan == runtime.DistributedPlan(True, "cluster", "gketpu", None, 4, 2)


def test_gke_variables_without_tpu_are_not_a_tpu_pod(machine):
    # jax only trusts TPU_WORKER_HOSTNAMES on a TPU VM (libtpu + chips present).
    machine(tpu_vm=False, TPU_WORKER_HOSTNAMES="a,b", TPU_WORKER_ID="1")
    assert not runtime.plan_distributed().initialize


def test_slurm(machine):
    machine(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2",
            SLURM_PROCID="1", SLURM_LOCALID="0")
    plan = runtime.plan_distributed()
    assert plan == runtime.DistributedPlan(True, "cluster", "slurm", None, 2, 1)


def test_explicit_flags_win_over_a_detected_cluster(machine):
    machine(tpu_vm=True, metadata={}, TPU_WORKER_HOSTNAMES="a,b", TPU_WORKER_ID="1")
    plan = runtime.plan_distributed("127.0.0.1:1234", 2, 0)
    assert plan == runtime.DistributedPlan(True, "flags", None, "127.0.0.1:1234", 2, 0)
    assert plan.describe() == "explicit flags: process 0 of 2"


def test_incomplete_flags_without_cluster_are_refused(machine):
    machine()
    with pytest.raises(ConfigError, match="--num_processes and --process_id go together"):
        runtime.plan_distributed("127.0.0.1:1234", None, None)


def test_metadata_server_down_is_not_a_cluster(machine, monkeypatch):
    machine(tpu_vm=True, metadata={})

    def down(key):
        raise OSError("connection refused")

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", down)
    assert runtime.plan_distributed() == runtime.DistributedPlan(False, "single")


# -------------------------------------------------------------------------------------------
# Stop decisions taken together (end to end, 2 processes via vlm_jax.launch_local).
# -------------------------------------------------------------------------------------------


def _launch_two(repo_root, args, env=None):
    """Runs ``args`` as 2 local processes; returns ([(arrival time, line)], exit time, output)."""
    cmd = [sys.executable, "-u", "-m", "vlm_jax.launch_local", "--num_processes", "2",
           "--devices_per_process", "1", "--timeout", "300", "--grace", "120", "--", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=repo_root, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), x)
                                                          for x in proc.stdout), daemon=True)
    reader.start()
    proc.wait(timeout=400)
    t_exit = time.monotonic()
    reader.join(timeout=10)
    return lines, t_exit, "".join(x for _, x in lines)


@pytest.mark.e2e
def test_bad_samples_read_by_one_process_stop_both(repo_root, shapes_data_dir, tmp_path):
    """Bad samples only in the records process 1 reads (the odd positions of the global stream):
    both processes stop with the same DataError and exit code within 60 s of the first batch,
    instead of process 1 stopping alone and process 0 waiting in the next collective."""
    import grain
    from tests.test_sources import good, write_shard

    n, seed = 256, 0
    # The pipeline's global stream: one shuffle of the records (grain, seed = config.seed);
    # process i of 2 reads positions i, i + 2, ... Half of process 1's positions are bad.
    order = list(grain.MapDataset.source(list(range(n))).shuffle(seed=seed))
    bad = {order[p] for p in range(n) if p % 4 == 1}
    samples = []
    for i in range(n):
        key, members = good(i)
        if i in bad:
            members = {"png": members["png"], "txt": b"   "}  # empty caption
        samples.append((key, members))
    write_shard(tmp_path / "train-0.tar", samples[:n // 2])
    write_shard(tmp_path / "train-1.tar", samples[n // 2:])
    workdir = tmp_path / "run"
    args = ["train", "--config", str(repo_root / "experiments/clip_tiny.py") + ":test",
            "--workdir", str(workdir), f"--config.data.data_dir={shapes_data_dir}",
            "--config.data.name=webdataset", f"--config.data.train_files={tmp_path}/train-*.tar",
            "--config.data.max_skipped_fraction=0.1", f"--config.seed={seed}",
            "--config.total_steps=30", "--config.log_every_steps=1",
            "--config.checkpoint.every_steps=1000", "--config.evals={}"]
    lines, t_exit, out = _launch_two(repo_root, args)
    # The training loop starts (and reads its first batch) right after this line.
    t_start = next((t for t, x in lines if "[p0] Model clip" in x), None)
    errors = {p: (t, msg) for t, x in lines
              for p, msg in re.findall(r"\[p(\d)\] .*?vlm-jax train: (DataError: .*)", x)}
    codes = dict(re.findall(r"\[launch_local\] process (\d) exited with code (-?\d+)", out))
    assert t_start is not None and errors.keys() == {"0", "1"}, out[-3000:]
    first = min(t for t, _ in errors.values())
    print(f"\nfirst batch -> both processes exited: {t_exit - t_start:.1f} s (first error "
          f"printed -> both exited: {t_exit - first:.1f} s); exit codes {codes}; "
          f"messages {[m for _, m in errors.values()]}")
    assert codes == {"0": "2", "1": "2"}, out[-3000:]
    assert errors["0"][1] == errors["1"][1], out[-3000:]  # The same message on both.
    message = errors["0"][1]
    assert "max_skipped_fraction=0.1" in message and "empty_caption" in message
    assert t_exit - t_start < 60


@pytest.mark.e2e
@pytest.mark.parametrize("fault,code,shown", [
    # The same agreement as the evaluator error; a minute of the default suite's time.
    pytest.param("data_error@3:p1", 2,
                 "vlm-jax train: DataError: process 1: injected fault data_error@3",
                 marks=pytest.mark.slow),
    ("eval_error@2:p1", 1, "RuntimeError: process 1: injected fault eval_error@2")])
def test_an_error_on_one_process_stops_both(fault, code, shown, repo_root, shapes_data_dir,
                                            tmp_path):
    """Process 1 alone fails (its data iterator, or an evaluator) while process 0 goes on into
    the next collective: process 0 stops too, with the same error and exit code, in seconds."""
    args = ["train", "--config", str(repo_root / "experiments/clip_tiny.py") + ":test",
            "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={shapes_data_dir}",
            "--config.total_steps=30", "--config.log_every_steps=1",
            "--config.checkpoint.every_steps=1000", "--config.evals={'zeroshot': "
            "{'type': 'zeroshot', 'dataset': 'shapes', 'split': 'test', 'every_steps': 2, "
            "'max_examples': 128, 'options': {}}}"]
    lines, t_exit, out = _launch_two(repo_root, args, env=dict(os.environ, VLM_JAX_FAULTS=fault))
    codes = dict(re.findall(r"\[launch_local\] process (\d) exited with code (-?\d+)", out))
    t_fail = next((t for t, x in lines if "[p1]" in x and "injected fault" in x), None)
    assert t_fail is not None, out[-3000:]
    print(f"\n{fault}: process 1 failed -> both exited: {t_exit - t_fail:.1f} s; exit codes "
          f"{codes}")
    assert codes == {"0": str(code), "1": str(code)}, out[-3000:]
    assert any(x.startswith("[p0]") and shown in x for _, x in lines), out[-3000:]
    assert t_exit - t_fail < 60
