"""Run versions are unique; one run per site at a time (issue #24, case 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vadflow.tasks.runs import SiteBusyError, lock_path, run_version, site_lock


def test_run_versions_started_in_one_second_differ_and_sort_by_time():
    moment = datetime(2026, 12, 6, 7, 38, 12, 345678, tzinfo=UTC)
    same = {run_version(moment) for _ in range(200)}
    assert len(same) > 190  # 65,536 suffixes: a collision among 200 is rare, 10 is impossible
    assert all(v.startswith("20261206T073812.345-") for v in same)
    later = run_version(datetime(2026, 12, 6, 7, 38, 12, 346000, tzinfo=UTC))
    assert max(same) < later


def test_a_second_run_of_a_site_is_refused_with_who_holds_it(tmp_path: Path):
    with site_lock(tmp_path, "hospital-a", "v1") as path:
        assert path == lock_path(tmp_path, "hospital-a")
        with pytest.raises(SiteBusyError) as refused, site_lock(tmp_path, "hospital-a", "v2"):
            pass
        message = str(refused.value)
        assert f"PID {os.getpid()}" in message and "run v1" in message
        assert "site hospital-a is being run by" in message
        with site_lock(tmp_path, "hospital-b", "v3"):  # other sites are free
            pass
    with site_lock(tmp_path, "hospital-a", "v4"):  # released when the block ends
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path):
    holder = textwrap.dedent(
        """
        import sys, time
        from vadflow.tasks.runs import site_lock
        with site_lock(sys.argv[1], "hospital-a", "killed"):
            print("locked", flush=True)
            time.sleep(600)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        with (
            pytest.raises(SiteBusyError, match="run killed"),
            site_lock(tmp_path, "hospital-a", "x"),
        ):
            pass
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        with site_lock(tmp_path, "hospital-a", "after"):  # the kernel released it
            assert "after" in lock_path(tmp_path, "hospital-a").read_text()
    finally:
        process.kill()
        process.wait()


def test_lock_file_names_are_safe(tmp_path: Path):
    assert lock_path(tmp_path, "../etc/passwd").parent == tmp_path / "locks"
    assert lock_path(tmp_path, "line a/b").name == "line_a_b.lock"


@pytest.mark.flow
def test_the_nightly_flow_refuses_a_site_another_run_holds(
    prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from vadflow.flows.nightly import nightly
    from vadflow.tasks.synth.industrial import make_industrial_site

    site = make_industrial_site(tmp_path, "line-a", n_train=2, n_test_good=1, n_test_per_defect=1)
    monkeypatch.setenv("VADFLOW_HOME", str(tmp_path / "home"))
    holder = site_lock(tmp_path / "home", "line-a", "the-first-run")
    with holder, pytest.raises(SiteBusyError, match="run the-first-run"):
        nightly(site_dir=str(site), output_root=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "line-a" / "slides.parquet").exists()  # nothing was written
