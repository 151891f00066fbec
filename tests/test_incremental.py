"""A nightly costs what changed (issue #22 item 1): slides hashed once, passing manifests not
checked again, unchanged families not retrained and unchanged slides not rescored; `force`
redoes everything."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from vadflow.tasks.slides import register
from vadflow.tasks.slides.discover import discover
from vadflow.tasks.synth.pathology import make_pathology_site


@pytest.fixture(scope="module")
def small_site(tmp_path_factory) -> Path:
    return make_pathology_site(
        tmp_path_factory.mktemp("incremental"),
        "inc",
        n_train_normal=2,
        n_test_normal=1,
        n_test_tumor=1,
        width=512,
        height=512,
        seed=3,
    )


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files hashed in full, in order."""
    calls: list[str] = []
    full = register.sha256_file

    def counting(path, chunk=1 << 20):
        calls.append(Path(path).name)
        return full(path, chunk)

    monkeypatch.setattr(register, "sha256_file", counting)
    return calls


def _register(site: Path, index: Path, **kw) -> register.Registration:
    return register.register_slides(
        discover(str(site), "pathology"), "inc", "pathology", index_uri=str(index), **kw
    )


def test_a_rerun_hashes_and_opens_nothing_unchanged(small_site, tmp_path, hashed, monkeypatch):
    index = tmp_path / register.INDEX_FILE
    first = _register(small_site, index)
    assert len(hashed) == 4 and sorted(first.hashed) == sorted(r["slide_id"] for r in first.rows)
    hashed.clear()

    def never_opened(*args, **kwargs):
        raise AssertionError("an unchanged slide was opened")

    monkeypatch.setattr(register, "Slide", never_opened)
    second = _register(small_site, index)
    assert hashed == [] and second.hashed == []
    assert sorted(second.reused) == sorted(first.hashed)
    assert second.rows == first.rows  # the TIFF check's result included: the same rows
    # --force hashes and opens every slide again
    monkeypatch.undo()
    monkeypatch.setattr(register, "sha256_file", lambda p, chunk=1 << 20: hashed.append(p) or "x")
    forced = _register(small_site, index, force=True)
    assert len(hashed) == 4 and forced.reused == []


def test_a_slide_edited_in_place_is_hashed_again(small_site, tmp_path, hashed):
    site = tmp_path / "site"
    import shutil

    shutil.copytree(small_site, site)
    index = tmp_path / register.INDEX_FILE
    before = {r["slide_id"]: r["sha256"] for r in _register(site, index).rows}
    hashed.clear()
    # Same size, mtime put back: only the content sample can tell.
    slide = next((site / "training" / "normal").glob("*.tif"))
    stat = slide.stat()
    data = bytearray(slide.read_bytes())
    data[-10] ^= 0xFF
    slide.write_bytes(bytes(data))
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert slide.stat().st_size == stat.st_size
    again = _register(site, index)
    assert hashed == [slide.name]
    changed = {r["slide_id"]: r["sha256"] for r in again.rows}
    assert changed[slide.stem] != before[slide.stem]
    assert {k: v for k, v in changed.items() if k != slide.stem} == {
        k: v for k, v in before.items() if k != slide.stem
    }


def test_a_damaged_index_costs_a_rehash_not_a_wrong_row(small_site, tmp_path, hashed):
    index = tmp_path / register.INDEX_FILE
    _register(small_site, index)
    index.write_text("{not json")
    hashed.clear()
    assert len(_register(small_site, index).hashed) == 4 and len(hashed) == 4


def test_passing_manifests_are_not_checked_again(small_site, tmp_path, monkeypatch):
    from vadflow.tasks.validation import boundaries, check_manifests, report_folder

    manifest = tmp_path / "slides.parquet"
    register.slide_frame(_register(small_site, tmp_path / "index.json").rows).write_parquet(
        manifest
    )
    ran: list[str] = []
    real = boundaries.check_stage

    def counting(name, *frames, **kw):
        ran.append(name)
        return real(name, *frames, **kw)

    monkeypatch.setattr(boundaries, "check_stage", counting)

    def check(run: str, **kw):
        return check_manifests(
            manifest, [], report_dir=report_folder(tmp_path / "reports", run), reuse=True, **kw
        )

    check("night-1")
    assert ran == ["slide_manifest", "tile_manifest"]
    second = check("night-2")
    assert ran == ["slide_manifest", "tile_manifest"]  # nothing ran again
    assert second.stages[0] == "slide_manifest (unchanged since night-1)"
    assert (tmp_path / "reports" / "contracts" / "passed.json").is_file()
    # One byte of the manifest changes: the contracts run again.
    frame = pl.read_parquet(manifest).with_columns(pl.lit("normal").alias("label"))
    frame.write_parquet(manifest)
    check("night-3")
    assert ran.count("slide_manifest") == 2
    # Without reuse (`vadflow validate`, --force) they always run.
    check_manifests(manifest, [], report_dir=report_folder(tmp_path / "reports", "n4"))
    assert ran.count("slide_manifest") == 3


def test_a_failing_result_is_not_remembered(small_site, tmp_path):
    from vadflow.data_contracts import ContractError
    from vadflow.tasks.validation import check_manifests, report_folder
    from vadflow.tasks.validation.passed import PassedResults

    rows = _register(small_site, tmp_path / "index.json").rows
    rows[0] = {**rows[0], "width": -5}
    manifest = tmp_path / "slides.parquet"
    register.slide_frame(rows).write_parquet(manifest)
    reports = tmp_path / "reports"
    for run in ("a", "b"):  # fails both times: a failure is never skipped
        with pytest.raises(ContractError):
            check_manifests(manifest, [], report_dir=report_folder(reports, run), reuse=True)
    assert PassedResults(reports / "contracts").entries == {}
