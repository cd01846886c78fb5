"""Crash consistency: SIGKILL `python -m transfer_service` during a head save, during training and
between a head's rename and its job's commit, restart it on the same store, and check nothing
was lost or half-written, and that a job cut off by a kill runs again (jobs are a queue) and
ends with exactly one head. A few kills of the chaos run behind `make chaos`
(tools/reliability/chaos.py, which lists every check and adds delete and start-up kills)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.reliability.chaos import run_chaos


def test_a_kill_during_a_head_save_leaves_a_consistent_store(tmp_path: Path) -> None:
    report = run_chaos(
        1,
        modes=("saving",),
        seed=5,
        work_dir=tmp_path,
        shuffle=False,
        saving_delays=(0.0,),  # kill as the .partial directory appears: before the rename
        log=lambda line: None,
    )
    assert not report.violations, report.summary()
    assert report.total_kills == 1 and report.restarts == 2, report.summary()
    assert report.head_checks >= 2, report.summary()  # both heads compared after the restart


def test_a_kill_during_training_leaves_a_job_that_runs_again_and_a_store_that_restarts(
    tmp_path: Path,
) -> None:
    report = run_chaos(1, modes=("training",), seed=6, work_dir=tmp_path, log=print)
    assert not report.violations, report.summary()
    outcomes = report.outcomes
    assert len(outcomes.cut_off) == 1, report.summary()
    # It ran again from the start (a `restarted` warning, its stream continued) and ended
    # with its one head.
    assert outcomes.restarted == outcomes.rerun_succeeded == outcomes.cut_off, report.summary()
    assert not outcomes.lost and not outcomes.duplicate_heads, report.summary()


def test_a_kill_between_head_rename_and_job_commit_leaves_no_orphan_head(tmp_path: Path) -> None:
    report = run_chaos(1, modes=("commit",), seed=7, work_dir=tmp_path, shuffle=False, log=print)
    if not report.kills["commit"]:
        pytest.skip("the rename-to-commit window was not caught this time")
    assert not report.violations, report.summary()
    assert not report.outcomes.duplicate_heads, report.summary()
