"""Which model a scoring run uses: a local detector folder for what the user named.

    model_dir = resolve_model("champion", site="hospital-a", family="ae_l2", ...)

The forms (each resolved against `tracking_uri`, the site's own store under `--home` or a
tracking server, never mlflow's global tracking or registry URI):

- a folder: a saved detector (`config.json`), or a downloaded MLflow model (`MLmodel`);
- `champion`: this site's registered champion; `champion@<site>`: another site's (cross-site);
- `models:/<name>/<version>`, `models:/<name>@<alias>`: a registered model version;
- `models:/<model_id>`: a logged model by its id (`m-...`, what a run's page shows);
- `runs:/<run_id>/model`: the model a run logged (MLflow 3 keeps it as a logged model, not under
  the run's artifacts, so it is found by the run's logged models first).

Downloads land in `<cache_root>/model-cache/<uri>/`, written under a temporary name and renamed
when complete, so an interrupted download never passes for a model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vadflow.tasks.tracking.lifecycle import process_alive
from vadflow.tasks.tracking.pyfunc import find_logged_models
from vadflow.tasks.tracking.registry import (
    CHAMPION,
    NOT_FOUND,
    alias_version,
    detector_folder,
    registered_model_name,
)

PARTIAL = ".partial-"  # a download in progress: `<target>.partial-<pid>`
FORMS = (
    "a folder, champion, champion@<site>, models:/<name>/<version>, models:/<name>@<alias>, "
    "models:/<model_id>, runs:/<run_id>/model"
)


def resolve_model(model: str, site: str, family: str, tracking_uri: str, cache_root: str) -> str:
    """A local detector folder for `model` (see the module's list of forms)."""
    if Path(model).is_dir():
        return str(local_detector(Path(model)))
    cache = Path(cache_root) / "model-cache"
    if model == "champion" or model.startswith("champion@"):
        # "champion@<other-site>": another hospital's model, for cross-site evaluation.
        owner = model.partition("@")[2] or site
        uri = f"models:/{registered_model_name(owner, family)}@{CHAMPION}"
        try:
            return str(download_model(uri, tracking_uri, cache / f"{owner}-{family}-champion"))
        except LookupError as exc:
            others = champions_of(owner, tracking_uri)
            raise LookupError(
                f"{registered_model_name(owner, family)} has no champion at {tracking_uri} "
                f"({exc}): run the nightly flow first; a version below the promotion floor "
                "is registered but not champion (its `promotion` tag says why), so name it "
                "as models:/<name>/<version> to use it anyway"
                + (
                    f". {owner}'s champions: {', '.join(others)} (a champion is per family: "
                    "give --family)"
                    if others
                    else ""
                )
            ) from exc
    if not model.startswith(("models:/", "runs:/")):
        raise ValueError(
            f"model {model!r} is neither a folder nor an MLflow model URI; give one of: {FORMS}"
        )
    return str(download_model(model, tracking_uri, cache / _safe_name(model)))


def champions_of(site: str, tracking_uri: str) -> list[str]:
    """The registered models of `site` (`<site>-<family>[-<category>]`) that have a champion;
    empty when the store cannot say. The LIKE filter only narrows the search (`_` is its
    wildcard, and site "a" would match site "a-b"'s models): a name counts when what follows
    `<site>-` starts with a known family."""
    from vadflow.tasks.detectors.registry import available_families

    try:
        models = MlflowClient(tracking_uri).search_registered_models(
            filter_string=f"name LIKE '{site}-%'"
        )
    except MlflowException:
        return []
    families = set(available_families())
    prefix = f"{site}-"
    return sorted(
        m.name
        for m in models
        if CHAMPION in (m.aliases or {})
        and m.name.startswith(prefix)
        and m.name[len(prefix) :].partition("-")[0] in families
    )


def local_detector(folder: Path) -> Path:
    """The detector folder of a local folder: itself, or the one inside an MLflow model."""
    if (folder / "config.json").is_file():
        return folder
    if (folder / "MLmodel").is_file():
        return detector_folder(folder)
    raise ValueError(
        f"{folder} holds neither a saved detector (config.json) nor an MLflow model (MLmodel)"
    )


def model_location(uri: str, tracking_uri: str) -> str:
    """Where the model `uri` names is stored (an artifact URI), asked of `tracking_uri`'s
    tracking store and registry. Raises LookupError naming what is missing."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        if uri.startswith("runs:/"):
            return _run_model_location(client, uri)
        return _registered_location(client, uri)
    except MlflowException as exc:
        if exc.error_code in (NOT_FOUND, "INVALID_PARAMETER_VALUE"):
            raise LookupError(f"{uri} is not in {tracking_uri}: {exc.message}") from exc
        raise


def download_model(uri: str, tracking_uri: str, target: Path) -> Path:
    """Download the model `uri` into `target` (replacing an earlier download) and return its
    detector folder."""
    import mlflow.artifacts

    location = model_location(uri, tracking_uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_downloads(target.parent)
    partial = target.with_name(f"{target.name}{PARTIAL}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=location, dst_path=str(partial), tracking_uri=tracking_uri
    )
    # download_artifacts puts a folder's *contents* in dst_path, a file beside its name.
    relative = Path(local).resolve().relative_to(partial.resolve())
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    found = target / relative
    if not (found / "MLmodel").is_file() and not (found / "config.json").is_file():
        raise LookupError(f"{uri}: downloaded to {found}, but it holds no vadflow model")
    return local_detector(found)


def remove_partial_downloads(folder: Path) -> list[Path]:
    """Remove downloads an interrupted process left (`*.partial-<pid>` of a dead process)."""
    removed = []
    for path in folder.glob(f"*{PARTIAL}*"):
        pid = path.name.rpartition(PARTIAL)[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _registered_location(client: MlflowClient, uri: str) -> str:
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = alias_version(client, name, alias)
        if version is None:
            raise LookupError(f"{uri}: registered model {name!r} has no alias {alias!r}")
    elif "/" in rest:
        name, _, number = rest.partition("/")
        version = client.get_model_version(name, number)
    else:  # models:/<model_id>: a logged model, registered or not
        return client.get_logged_model(rest).artifact_location
    if version.model_id:
        return client.get_logged_model(version.model_id).artifact_location
    return client.get_model_version_download_uri(version.name, str(version.version))


def _run_model_location(client: MlflowClient, uri: str) -> str:
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    path = path.strip("/")
    if not run_id or not path:
        raise ValueError(f"{uri}: expected runs:/<run_id>/<model name>, e.g. runs:/<run_id>/model")
    logged = find_logged_models(client, run_id, path)
    if logged:
        return logged[0].artifact_location
    # A model saved under the run's own artifacts (MLflow 2 style) is a plain artifact path.
    run = client.get_run(run_id)
    listed = {item.path for item in client.list_artifacts(run_id, path)}
    if f"{path}/MLmodel" not in listed:
        raise LookupError(
            f"{uri}: run {run_id} logged no model named {path!r} (neither a logged model nor "
            "an artifact folder with an MLmodel)"
        )
    return f"{run.info.artifact_uri.rstrip('/')}/{path}"


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
