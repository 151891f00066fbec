"""Which model a scoring run uses: a local detector folder for what the user named.

    model_dir = resolve_model("champion", site="hospital-a", family="ae_l2", ...)

A folder is used as it is; `champion` is this site's registered champion, `champion@<site>`
another site's (for cross-site evaluation); `models:/...` and `runs:/...` are MLflow model URIs.
Downloads are cached under `<cache_root>/model-cache/`.
"""

from __future__ import annotations

from pathlib import Path

from vadflow.tasks.tracking.registry import download_champion


def resolve_model(model: str, site: str, family: str, tracking_uri: str, cache_root: str) -> str:
    """A local detector folder for `model`: a folder, an MLflow model URI, 'champion' (this
    site's) or 'champion@<site>' (another site's)."""
    import mlflow.artifacts

    if Path(model).is_dir():
        return model
    if model == "champion" or model.startswith("champion@"):
        # "champion@<other-site>": another hospital's model, for cross-site evaluation.
        owner = model.partition("@")[2] or site
        target = Path(cache_root) / "model-cache" / f"{owner}-{family}-champion"
        return str(download_champion(tracking_uri, owner, family, target))
    uri = model
    if not uri.startswith(("models:/", "runs:/")):
        raise ValueError(
            f"model {model!r} is neither a folder nor an MLflow model URI "
            "(models:/<name>@<alias>, models:/<name>/<version>, runs:/<run>/model)"
        )
    target = Path(cache_root) / "model-cache" / _safe_name(uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri
    )
    found = sorted(Path(local).rglob("config.json"))
    detector_dirs = [p.parent for p in found if (p.parent / "weights.pt").exists()]
    if not detector_dirs:
        raise ValueError(f"{uri}: downloaded, but it holds no vadflow detector (config.json)")
    return str(detector_dirs[0])


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
