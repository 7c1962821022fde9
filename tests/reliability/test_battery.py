"""The fault battery under pytest: every fault survived, nothing written before it lost.

Each test runs one scenario of ``tests/reliability/battery.py`` (the real ``vlm-jax train`` in
subprocesses) and checks the row it produces: the run survived, at most the steps since the
last checkpoint were lost, no data was lost (resumed losses equal an uninterrupted run's), and
every scenario-specific check held (exit codes, messages, partial checkpoints removed...).
"""
import pytest

from tests.reliability import battery as battery_lib

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def battery(tmp_path_factory, shapes_data_dir):
    return battery_lib.Battery(tmp_path_factory.mktemp("faults"), shapes_data_dir, seed=0)


def _check(row, max_steps_lost):
    failed = [k for k, v in row.checks.items() if not v]
    assert row.survived and not failed, (row, failed)
    assert row.data_lost == "none", row
    if max_steps_lost is not None:
        assert row.steps_lost is not None and row.steps_lost <= max_steps_lost, row


def test_sigterm_saves_the_current_step_and_exits_0(battery):
    _check(battery.sigterm(), max_steps_lost=0)


def test_sigterm_two_processes_save_the_same_step(battery):
    _check(battery.sigterm_two_processes(), max_steps_lost=0)


def test_sigkill_at_a_random_step_resumes_bit_exact(battery):
    # An async save still in flight at the kill is not a checkpoint: up to two intervals.
    _check(battery.sigkill(), max_steps_lost=2 * battery_lib.EVERY - 1)


def test_kill_during_save_keeps_the_previous_checkpoint(battery):
    # The save is killed at its commit, which runs in the background while training goes on.
    _check(battery.kill_in_save(), max_steps_lost=2 * battery_lib.EVERY)


def test_checkpoint_restores_on_other_meshes(battery):
    _check(battery.reshard(), max_steps_lost=0)


def test_nan_loss_skipped(battery):
    _check(battery.nan_skip(), max_steps_lost=1)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(battery):
    _check(battery.nan_stop(), max_steps_lost=battery_lib.EVERY)


def test_changed_config_and_bad_workdir_refused_before_compute(battery):
    for row in battery.config_changes():
        _check(row, max_steps_lost=0)


def test_full_disk(battery):
    rows = battery.disk_full()
    if any(row.data_lost == "not run" for row in rows):
        pytest.skip("mounting a tmpfs is not permitted here")
    for row in rows:  # The save that hit the full disk is lost too: up to two intervals.
        _check(row, max_steps_lost=2 * battery_lib.EVERY)
