"""Chaos on replicas (a few kills of `make chaos-replicas`, tools/reliability/replica_chaos.py):
three servers on one PostgreSQL, jobs submitted all along, a replica SIGKILLed (mostly while
it runs a job) and restarted three times. Every job ends, none is lost, no job has two heads,
and the jobs a kill cut off ran again on another replica."""

from __future__ import annotations

from pathlib import Path

from tools.reliability.replica_chaos import run_replica_chaos


def test_killed_replicas_jobs_run_again_and_end_with_one_head(
    tmp_path: Path, database_url: str
) -> None:
    report = run_replica_chaos(
        3, replicas=3, seed=3, work_dir=tmp_path, database_url=database_url, log=print
    )
    assert not report.violations, report.summary()
    assert report.kills == 3 and report.restarts == 3, report.summary()
    outcomes = report.outcomes
    assert report.jobs_submitted == sum(outcomes.ended.values()) > 0, report.summary()
    assert not outcomes.lost and not outcomes.duplicate_heads, report.summary()
    if report.kills_during_jobs:
        assert outcomes.restarted, report.summary()  # taken over once the lease ran out
    assert report.heads_checked == outcomes.ended["JOB_STATE_SUCCEEDED"], report.summary()
