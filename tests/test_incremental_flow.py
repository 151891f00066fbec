"""The nightly flow run three times on one tiny site: a second night with nothing new hashes,
checks, trains and scores nothing again; a third with `force` redoes it all (issue #22)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vadflow.tasks import progress

pytestmark = [pytest.mark.slow, pytest.mark.flow]


@pytest.fixture(scope="module")
def nights(prefect_harness, state_dir: Path) -> dict:
    from vadflow.flows.nightly import nightly
    from vadflow.tasks.scoring import run as scoring
    from vadflow.tasks.slides import register
    from vadflow.tasks.synth.pathology import make_pathology_site

    site = make_pathology_site(
        state_dir / "data",
        "inc-flow",
        n_train_normal=3,
        n_test_normal=2,
        n_test_tumor=2,
        width=2048,
        height=1536,
        seed=7,
    )
    out = state_dir / "outputs-incremental"
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'incremental.db'}"
    counts: dict[str, list] = {"hashed": [], "scored": []}
    full, score = register.sha256_file, scoring.score_with_model
    nights: dict = {"site": site, "out": out / "inc-flow"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            register,
            "sha256_file",
            lambda p, chunk=1 << 20: counts["hashed"].append(p) or full(p, chunk),
        )
        patch.setattr(
            scoring,
            "score_with_model",
            lambda model_dir, row, *a: (
                counts["scored"].append(row["slide_id"]) or score(model_dir, row, *a)
            ),
        )
        for night, force in (("first", False), ("second", False), ("forced", True)):
            counts["hashed"].clear()
            counts["scored"].clear()
            seen: list[progress.Progress] = []
            with progress.listening(seen.append):
                summary = nightly(
                    str(site),
                    output_root=str(out),
                    tracking_uri=tracking,
                    flags={"epochs": 1},
                    export=False,
                    force=force,
                    families=["ae_l2"],
                )
            nights[night] = {
                "summary": summary,
                "hashed": list(counts["hashed"]),
                "scored": list(counts["scored"]),
                "progress": seen,
                "index_mtime": (out / "inc-flow" / register.INDEX_FILE).stat().st_mtime_ns,
            }
    return nights


def _heatmaps(summary) -> list[str]:
    found = Path(summary.outputs).glob(f"heatmaps/ae_l2-{summary.version}/*.heatmap.tif")
    return sorted(p.name.split(".")[0] for p in found)


def test_the_first_night_hashes_and_scores_every_slide(nights) -> None:
    first = nights["first"]
    assert len(first["hashed"]) == 7
    assert sorted(first["scored"]) == _heatmaps(first["summary"])
    assert len(first["scored"]) >= 3  # the held-out normal and the test slides with tissue


def test_a_night_with_nothing_new_redoes_nothing(nights) -> None:
    first, second = nights["first"]["summary"], nights["second"]["summary"]
    assert nights["second"]["hashed"] == []
    assert nights["second"]["scored"] == []  # no pixel decoded for scoring either
    # The same model folder, with the reason shown on the train stage's progress line.
    assert second.families["ae_l2"].model_dir == first.families["ae_l2"].model_dir
    lines = [p.detail for p in nights["second"]["progress"] if p.stage == "train ae_l2"]
    assert lines == [f"unchanged since {first.version}"]
    contracts = Path(second.outputs) / "reports" / "contracts" / "passed.json"
    assert contracts.is_file()
    # Same slide scores: the reused heatmaps are the first night's.
    before = {r.slide_id: r.score for r in first.families["ae_l2"].table}
    assert {r.slide_id: r.score for r in second.families["ae_l2"].table} == before
    assert _heatmaps(second) == _heatmaps(first)  # tonight's folder is complete


def test_force_redoes_everything(nights) -> None:
    first, forced = nights["first"]["summary"], nights["forced"]["summary"]
    assert len(nights["forced"]["hashed"]) == 7
    assert sorted(nights["forced"]["scored"]) == _heatmaps(first)
    assert forced.families["ae_l2"].model_dir != first.families["ae_l2"].model_dir
    assert forced.version in forced.families["ae_l2"].model_dir
