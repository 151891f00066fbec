"""Data contracts in the nightly flow: a corrupted tile manifest stops the run before training
(strict, the default), or only its slide is set aside and the rest trains (quarantine).

How the corruption gets past tiling: a slide's `<slide>.done.json` marker fingerprints the
slide's content hash and the tiling settings, not the manifest's bytes (tasks/tiling/grid.py).
So each site is tiled once by the real ingest stages, then one slide's
`tiles/<slide>.parquet` is rewritten with an out-of-bounds tile and a duplicated tile id while
its marker is left as it was. The nightly rerun skips that slide's tiling (the test checks the
bad manifest is still on disk afterwards) and meets the damage at the contract boundary, as it
would meet a manifest damaged on disk or by a faulty writer after tiling.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from vadflow.data_contracts import ContractError

pytestmark = [pytest.mark.slow, pytest.mark.flow]

FAMILY = "ae_l2"
OUT_OF_BOUNDS = "expect_column_pair_values_a_to_be_greater_than_b"  # width >= x_end
DUPLICATE = "expect_column_values_to_be_unique"  # tile_id


def _tiled_site(state_dir: Path, name: str, extra_yaml: str) -> dict:
    """A tiny synthetic site, registered and tiled once by the flow's own ingest stages."""
    from vadflow.flows.ingest import ingest
    from vadflow.tasks.site import SiteLayout, load_site
    from vadflow.tasks.synth.pathology import make_pathology_site

    site_dir = make_pathology_site(
        state_dir / "data",
        name,
        n_train_normal=3,  # 2 train + 1 held-out val
        n_test_normal=2,
        n_test_tumor=2,
        width=2048,
        height=1536,
        seed=5,
    )
    with (site_dir / "site.yaml").open("a") as handle:
        handle.write(
            f"detectors: {{{FAMILY}: {{epochs: 1, base_channels: 8, patience: 1}}}}\n" + extra_yaml
        )
    site = load_site(site_dir)
    output_root = state_dir / "outputs"
    layout = SiteLayout(output_root, site.name)
    first = ingest(site, layout, "first-tiling")
    assert first.checked.quarantined == [] and len(first.tiling) == 7
    return {"site_dir": site_dir, "site": site, "layout": layout, "output_root": output_root}


def _corrupt_a_train_slide(layout) -> dict:
    """Rewrite one train slide's tile manifest: its last tile moved past the slide's right edge,
    its first tile listed twice. The done marker is not touched."""
    slides = pl.read_parquet(layout.root / "slides.parquet")
    row = slides.filter(pl.col("split") == "train").sort("slide_id").row(0, named=True)
    path = layout.root / "tiles" / f"{row['slide_id']}.parquet"
    marker = path.with_suffix(".done.json")
    assert marker.exists()
    tiles = pl.read_parquet(path)
    moved_id = tiles["tile_id"][-1]
    twice_id = tiles["tile_id"][0]
    moved = tiles.with_columns(
        pl.when(pl.col("tile_id") == moved_id)
        .then(pl.lit(row["width"]))  # x_end = width + extent: past the edge, still on the grid
        .otherwise(pl.col("x"))
        .cast(tiles.schema["x"])
        .alias("x")
    )
    corrupted = pl.concat([moved, moved.head(1)])
    corrupted.write_parquet(path)
    return {
        "slide_id": row["slide_id"],
        "path": path,
        "frame": corrupted,
        "marker": marker,
        "marker_bytes": marker.read_bytes(),
        "moved_id": moved_id,
        "twice_id": twice_id,
    }


def _assert_corruption_untouched(bad: dict) -> None:
    """Tiling skipped the slide: its marker and the corrupted manifest are as we left them."""
    assert bad["marker"].read_bytes() == bad["marker_bytes"]
    assert pl.read_parquet(bad["path"]).equals(bad["frame"])


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


# --- strict (the default): the run stops before training ----------------------------------


@pytest.fixture(scope="module")
def strict_run(prefect_harness, state_dir: Path) -> dict:
    from vadflow.flows.nightly import nightly

    tiled = _tiled_site(state_dir, "contracts-strict", "")
    assert tiled["site"].contracts == "strict"  # the default, not set in site.yaml
    bad = _corrupt_a_train_slide(tiled["layout"])
    tracking_db = state_dir / "home" / "mlflow" / "contracts-strict.db"
    state = nightly(
        str(tiled["site_dir"]),
        output_root=str(tiled["output_root"]),
        tracking_uri=f"sqlite:///{tracking_db}",
        return_state=True,
        families=["ae_l2"],
    )
    return {**tiled, "bad": bad, "state": state, "tracking_db": tracking_db}


def test_strict_contract_failure_names_rule_slide_and_rows(strict_run) -> None:
    state, bad = strict_run["state"], strict_run["bad"]
    assert state.is_failed(), state
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ContractError), repr(error)
    message = str(error)
    assert "contract 'tile_manifest' failed" in message
    # Each broken rule, what it means, and its count.
    assert f"{DUPLICATE} on 'tile_id'" in message and "2 unexpected" in message  # both copies
    assert f"{OUT_OF_BOUNDS} on 'width, x_end'" in message and "(x_end <= width)" in message
    assert "1 unexpected, e.g. [(2048, 2176)]" in message
    # The slide, and example rows naming the offending tiles.
    assert f"slides with failing rows: {bad['slide_id']}" in message
    assert bad["twice_id"] in message and bad["moved_id"] in message
    failing = {f.expectation: f for f in error.result.failures}
    assert set(failing) == {DUPLICATE, OUT_OF_BOUNDS}
    assert failing[DUPLICATE].slide_counts == {bad["slide_id"]: 2}  # both copies
    assert failing[OUT_OF_BOUNDS].slide_counts == {bad["slide_id"]: 1}
    # The report on disk says the same, for whoever opens it in the morning.
    index = Path(error.report)
    assert index.parent.parent == strict_run["layout"].root / "reports" / "contracts"
    report = index.read_text()
    assert "FAILED" in report and bad["moved_id"] in report and bad["twice_id"] in report
    _assert_corruption_untouched(bad)


def test_strict_contract_failure_stops_before_training(strict_run) -> None:
    state, layout = strict_run["state"], strict_run["layout"]
    runs = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(state.state_details.flow_run_id)}
    assert runs["validate-manifests"].state.is_failed()
    assert runs["tile-site"].state.is_completed()
    for later in ("start-tracking", "train", "score", "evaluate", "track"):
        assert later not in runs, f"{later} ran after a failed contract"
    assert not (layout.root / "models").exists()
    assert not (layout.root / "heatmaps").exists()
    # Tracking starts after the contracts: not even the night's parent run was logged.
    assert not strict_run["tracking_db"].exists()
    # Strict mode stops the run; it does not quarantine anything.
    slides = pl.read_parquet(layout.root / "slides.parquet")
    assert set(slides["status"]) == {"ok"}
    assert not (layout.root / "quarantine" / f"{strict_run['bad']['slide_id']}.json").exists()


# --- quarantine: the bad slide is set aside, the rest trains, scores and evaluates ----------


@pytest.fixture(scope="module")
def quarantine_run(prefect_harness, state_dir: Path) -> dict:
    from vadflow.flows.nightly import nightly

    tiled = _tiled_site(state_dir, "contracts-quarantine", "contracts: quarantine\n")
    bad = _corrupt_a_train_slide(tiled["layout"])
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'contracts-quarantine.db'}"
    summary = nightly(
        str(tiled["site_dir"]),
        output_root=str(tiled["output_root"]),
        tracking_uri=tracking,
        families=["ae_l2"],
    )
    return {**tiled, "bad": bad, "summary": summary, "tracking": tracking}


def test_quarantine_sets_the_bad_slide_aside_with_its_reason(quarantine_run) -> None:
    summary, bad, layout = (
        quarantine_run["summary"],
        quarantine_run["bad"],
        quarantine_run["layout"],
    )
    _assert_corruption_untouched(bad)
    assert [q.slide_id for q in summary.quarantined] == [bad["slide_id"]]
    reason = summary.quarantined[0].reason
    assert reason.startswith("contract 'tile_manifest'")
    assert f"{DUPLICATE} on 'tile_id'" in reason and f"{OUT_OF_BOUNDS} on 'width, x_end'" in reason
    record = json.loads((layout.root / "quarantine" / f"{bad['slide_id']}.json").read_text())
    assert record["contract"] == "tile_manifest" and record["reason"] == reason
    assert record["uri"].endswith(f"{bad['slide_id']}.tif")
    slides = pl.read_parquet(layout.root / "slides.parquet")
    row = slides.filter(pl.col("slide_id") == bad["slide_id"]).row(0, named=True)
    assert row["status"] == "quarantined" and row["reason"] == reason
    assert (slides["status"] == "ok").sum() == slides.height - 1
    outcome = json.loads((Path(summary.contracts_report) / "tile_manifest.json").read_text())
    assert outcome["outcome"] == "quarantined 1 slide(s)"


def test_quarantine_the_other_slides_train_score_and_evaluate(quarantine_run) -> None:
    summary, bad, layout = (
        quarantine_run["summary"],
        quarantine_run["bad"],
        quarantine_run["layout"],
    )
    result = summary.families[FAMILY]
    # Trained on exactly the tiles of the train slides that are left.
    slides = pl.read_parquet(layout.root / "slides.parquet")
    kept_train = slides.filter((pl.col("split") == "train") & (pl.col("status") == "ok"))
    assert kept_train.height == 1 and bad["slide_id"] not in kept_train["slide_id"]
    kept_tiles = sum(
        pl.read_parquet(layout.root / "tiles" / f"{s}.parquet").height
        for s in kept_train["slide_id"]
    )
    fit = json.loads((Path(result.model_dir) / "fit_report.json").read_text())
    assert fit["train_tiles"] == kept_tiles > 0
    # Every val and test slide was scored, evaluated and exported.
    scored = sorted(p.name.split(".")[0] for p in layout.root.glob("heatmaps/*/*.heatmap.tif"))
    expected = slides.filter(pl.col("split").is_in(["val", "test"]))["slide_id"].sort()
    assert scored == expected.to_list() and len(scored) == 5
    assert {r.slide_id for r in result.table} == set(
        slides.filter(pl.col("split") == "test")["slide_id"]
    )
    assert result.metrics["n_test_slides"] == 4
    assert 0.0 <= result.metrics["slide_auroc"] <= 1.0
    # Logged, but flagged: a model from a night with a quarantined slide is never promoted.
    run = MlflowClient(quarantine_run["tracking"]).get_run(result.mlflow_run_id)
    assert run.data.tags["contracts"] == "failed"
    assert result.promotion is not None and not result.promotion.promoted
