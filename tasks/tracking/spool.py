"""Tracking that survives an outage: log through a `TrackingSession`; what cannot reach the
tracking server is spooled to a local folder, and `sync` replays it later.

A session sends each call to MLflow at once. When a call fails because the server cannot be
reached (connection refused, timeout, 5xx after MLflow's short retry), the session goes offline
for the rest of its life and appends that call, and every later one, to its own JSONL file in
the spool folder, with a client-made idempotency key; files it logs are copied into the spool,
because the originals may be gone by the time the server is back. A run created while offline
gets a local reference (`local-...`) that `sync` maps to the server's run id.

`sync` replays the files in the order they were written and keeps a ledger (`state.json`) of
what it applied. Replays are idempotent even without the ledger: runs are found again by their
`vadflow.run_key` tag, metrics already in a run's history are not logged twice, models and model
versions are found by their op key, and a promotion already decided is not decided again.

Spool layout::

    <spool>/<session>.jsonl          one operation per line, in call order
    <spool>/files/<session>/<key>/   copies of the artifacts and models those operations log
    <spool>/state.json               run references resolved and operations applied, per file
    <spool>/synced/                  files (and their copies) fully replayed, kept for audit
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vadflow.tasks.tracking.mlflow_runs import (
    BATCH_LIMIT,
    TAG_PARENT,
    default_spool_dir,
    experiment_id_by_name,
    finite_metrics,
    now_ms,
    param_strings,
    resolve_tracking_uri,
)
from vadflow.tasks.tracking.pyfunc import MODEL_NAME, log_detector_model
from vadflow.tasks.tracking.registry import PromotionDecision, promote, register_model

logger = logging.getLogger(__name__)

SPOOL_FORMAT = 1
LOCAL_PREFIX = "local-"
RUN_KEY_TAG = "vadflow.run_key"
STATE_FILE = "state.json"
CLOSE_OP = "close"
STALE_AFTER_S = 3600.0  # an unclosed spool file this old belongs to a process that died

# MLflow's own defaults retry for minutes (7 retries, backoff 2); a nightly run that has finished
# training should give up in seconds and spool. Set only where the user has not set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def configure_http(overrides: Mapping[str, str] | None = None) -> None:
    """Short MLflow HTTP retries (process-wide; values already in the environment win)."""
    for key, value in {**HTTP_DEFAULTS, **(overrides or {})}.items():
        os.environ.setdefault(key, value)


def is_unreachable(exc: BaseException) -> bool:
    """True when `exc` means the tracking server (or its artifact store) could not be reached,
    as opposed to the server answering with an error about the request itself."""
    import requests
    import urllib3

    network = (
        ConnectionError,  # builtin: refused, reset, aborted
        TimeoutError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,  # 5xx until retries ran out
        urllib3.exceptions.MaxRetryError,
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.ProtocolError,
    )
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

        network += (EndpointConnectionError, ConnectionClosedError)
    markers = (
        "Max retries exceeded",
        "Connection refused",
        "failed with timeout exception",
        "Failed to establish a new connection",
        "Connection aborted",
        "RemoteDisconnected",
    )
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, network):
            return True
        if isinstance(current, MlflowException) and any(m in str(current) for m in markers):
            return True
        current = current.__cause__ or current.__context__
    return False


# --- the session ----------------------------------------------------------------------------


class TrackingSession:
    """MLflow logging calls that fall back to the spool when the server is unreachable.

    Calls take and return run *references*: the server's run id, or `local-...` for a run
    created while offline. Use one session per task or thread of work, and close it (or use it
    as a context manager) so `sync` knows its file is complete.
    """

    def __init__(
        self, tracking_uri: str | None = None, spool_dir: str | Path | None = None
    ) -> None:
        configure_http()
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.spool_dir = Path(spool_dir) if spool_dir else default_spool_dir()
        self.client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        self._session_id: str | None = None
        self.offline_reason: str | None = None
        self.spooled = 0  # operations written to the spool by this session
        self._lock = threading.RLock()
        self._file: Any = None
        # Runs with operations still waiting in the spool: later calls on them must queue
        # behind those, or the server would see them out of order.
        self._pending = pending_run_refs(self.spool_dir)

    # context manager ------------------------------------------------------------------

    def __enter__(self) -> TrackingSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._write({"op": CLOSE_OP, "key": _key(), "time": now_ms()})
                self._file.close()
                self._file = None

    @property
    def online(self) -> bool:
        return self.offline_reason is None

    @property
    def session_id(self) -> str:
        """Named when first needed, i.e. at the session's first spooled operation, so spool
        files sort in the order they started to be written."""
        if self._session_id is None:
            now = time.time_ns()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now / 1e9))
            self._session_id = f"{stamp}-{now % 10**9:09d}-{uuid.uuid4().hex[:8]}"
        return self._session_id

    @property
    def spool_file(self) -> Path:
        return self.spool_dir / f"{self.session_id}.jsonl"

    # logging calls ------------------------------------------------------------------------

    def start_run(
        self,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        *,
        parent: str | None = None,
        artifact_location: str | Path | None = None,
    ) -> str:
        """Create a run in experiment `experiment` (by name, created if missing); nested under
        `parent` if given. Returns its reference."""
        key = _key()
        args = {
            "experiment": experiment,
            "artifact_location": str(artifact_location) if artifact_location else None,
            "run_name": run_name,
            "tags": {k: str(v) for k, v in tags.items()},
            "parent": parent,
            "run_key": key,
            "start_time": now_ms(),
        }
        ref = f"{LOCAL_PREFIX}{key}"
        result = self._call(
            "create_run",
            ref=ref,
            depends=[parent] if parent else [],  # the new run itself cannot be queued behind
            key=key,
            online=lambda: _create_run(self.client, args, _identity, replay=False),
            args=lambda: args,
        )
        return result if result is not None else ref

    def log_params(self, run: str, params: Mapping[str, Any]) -> None:
        items = list(param_strings(params).items())
        for start in range(0, len(items), BATCH_LIMIT):
            self._log_batch(run, params=dict(items[start : start + BATCH_LIMIT]))

    def set_tags(self, run: str, tags: Mapping[str, Any]) -> None:
        items = [(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(items), BATCH_LIMIT):
            self._log_batch(run, tags=dict(items[start : start + BATCH_LIMIT]))

    def log_metrics(
        self,
        run: str,
        metrics: Mapping[str, Any],
        step: int = 0,
        timestamp: int | None = None,
    ) -> None:
        """Finite values only (NaN sorts badly in the dashboard)."""
        now = timestamp if timestamp is not None else now_ms()
        self.log_metric_series(
            run, [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
        )

    def log_metric_series(self, run: str, metrics: list[Metric]) -> None:
        """Metrics with their own steps and timestamps (training curves, system metrics)."""
        rows = [[m.key, float(m.value), int(m.timestamp), int(m.step)] for m in metrics]
        for start in range(0, len(rows), BATCH_LIMIT):
            self._log_batch(run, metrics=rows[start : start + BATCH_LIMIT])

    def log_artifact(self, run: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents, under `artifact_path`."""
        source = Path(path)
        if not source.exists():
            raise FileNotFoundError(f"cannot log artifact {source}: it does not exist")
        key = _key()

        def spool_args() -> dict[str, Any]:
            return {
                "run": run,
                "path": self._copy_in(key, source),
                "artifact_path": artifact_path,
            }

        self._call(
            "log_artifact",
            ref=run,
            key=key,
            online=lambda: _log_artifact(self.client, run, source, artifact_path),
            args=spool_args,
        )

    def log_model(
        self, run: str, detector_dir: str | Path, example: np.ndarray | None = None
    ) -> str | None:
        """Log a saved detector as the run's pyfunc model. Returns `models:/<id>` when sent now,
        None when spooled."""
        key = _key()
        source = Path(detector_dir)

        def spool_args() -> dict[str, Any]:
            args: dict[str, Any] = {"run": run, "detector_dir": self._copy_in(key, source)}
            if example is not None:
                target = self.spool_dir / "files" / self.session_id / key / "example.npy"
                np.save(target, example)
                args["example"] = str(target.relative_to(self.spool_dir))
            return args

        return self._call(
            "log_model",
            ref=run,
            key=key,
            online=lambda: log_detector_model(
                self.client, run, source, example, name=MODEL_NAME, op_key=key
            ),
            args=spool_args,
        )

    def register_and_promote(
        self,
        run: str,
        site: str,
        family: str,
        *,
        metric: str,
        margin: float = 0.0,
        higher_is_better: bool = True,
        contracts_passed: bool,
        diverged: bool,
        eval_set_hash: str | None = None,
        floor: Mapping[str, float] | None = None,
        version_tags: Mapping[str, str] | None = None,
    ) -> PromotionDecision | None:
        """Register the run's model as `<site>-<family>` (the version tagged `version_tags`,
        e.g. its datasets) and put it through the champion gate. None when spooled: the gate
        then runs at `sync`, against the champion of that time."""
        key = _key()
        args = {
            "run": run,
            "site": site,
            "family": family,
            "metric": metric,
            "margin": margin,
            "higher_is_better": higher_is_better,
            "contracts_passed": contracts_passed,
            "diverged": diverged,
            "eval_set_hash": eval_set_hash,
            "floor": None if floor is None else {k: float(v) for k, v in floor.items()},
            "version_tags": {k: str(v) for k, v in (version_tags or {}).items()},
        }
        return self._call(
            "register_and_promote",
            ref=run,
            key=key,
            online=lambda: _register_and_promote(self.client, args, _identity, key),
            args=lambda: args,
        )

    def end_run(self, run: str, status: str = "FINISHED") -> None:
        args = {"run": run, "status": status, "end_time": now_ms()}
        self._call(
            "end_run",
            ref=run,
            key=_key(),
            online=lambda: self.client.set_terminated(run, status, args["end_time"]),
            args=lambda: args,
        )

    # internals ----------------------------------------------------------------------------

    def _log_batch(
        self,
        run: str,
        *,
        metrics: list[list[Any]] | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        args = {"run": run, "metrics": metrics or [], "params": params or {}, "tags": tags or {}}
        if not (args["metrics"] or args["params"] or args["tags"]):
            return
        self._call(
            "log_batch",
            ref=run,
            key=_key(),
            online=lambda: _log_batch(self.client, args, _identity, replay=False),
            args=lambda: args,
        )

    def _call(
        self,
        op: str,
        *,
        ref: str,
        key: str,
        online: Callable[[], Any],
        args: Callable[[], dict[str, Any]],
        depends: list[str] | None = None,
    ) -> Any:
        """Send now (`online`) unless offline or `depends` (default: the run itself) has
        operations waiting in the spool; else append `args()` to the spool."""
        with self._lock:
            refs = [ref] if depends is None else depends
            if self.online and not any(self._must_queue(r) for r in refs):
                try:
                    return online()
                except Exception as exc:
                    if not is_unreachable(exc):
                        raise
                    self._go_offline(exc)
            self._write({"op": op, "key": key, "run": ref, "time": now_ms(), "args": args()})
            self._pending.add(ref)
            self.spooled += 1
            return None

    def _must_queue(self, ref: str) -> bool:
        return ref.startswith(LOCAL_PREFIX) or ref in self._pending

    def _go_offline(self, exc: BaseException) -> None:
        self.offline_reason = f"{type(exc).__name__}: {exc}"[:500]
        logger.warning(
            "tracking server %s is unreachable (%s); logging to the spool %s instead. "
            "Run `vadflow tracking sync` when it is back.",
            self.tracking_uri,
            self.offline_reason,
            self.spool_file,
        )

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.spool_file, "a", encoding="utf-8")  # noqa: SIM115
            self._write_raw({"op": "open", "format": SPOOL_FORMAT, "uri": self.tracking_uri})
        self._write_raw(record)

    def _write_raw(self, record: dict[str, Any]) -> None:
        record.setdefault("key", _key())
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _copy_in(self, key: str, source: Path) -> str:
        """Copy a file or folder into the spool; return its path relative to the spool."""
        target = self.spool_dir / "files" / self.session_id / key / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return str(target.relative_to(self.spool_dir))


def open_session(
    tracking_uri: str | None = None, home: Path | None = None, spool_dir: Path | None = None
) -> TrackingSession:
    """A session on the configured tracking URI, spooling under the project's state folder."""
    return TrackingSession(tracking_uri, spool_dir or default_spool_dir(home))


# --- operations: the same code sends a call now and replays it later -----------------------

Resolve = Callable[[str], str]


def _identity(ref: str) -> str:
    return ref


def _create_run(client: MlflowClient, args: dict, resolve: Resolve, replay: bool) -> str:
    experiment = experiment_id_by_name(client, args["experiment"], args.get("artifact_location"))
    if replay:
        found = client.search_runs(
            [experiment],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{args['run_key']}'",
            run_view_type=ViewType.ALL,
            max_results=1,
        )
        if found:
            return found[0].info.run_id
    tags = {**args["tags"], RUN_KEY_TAG: args["run_key"]}
    if args.get("parent"):
        tags[TAG_PARENT] = resolve(args["parent"])
    run = client.create_run(
        experiment, run_name=args["run_name"], tags=tags, start_time=args["start_time"]
    )
    return run.info.run_id


def _log_batch(client: MlflowClient, args: dict, resolve: Resolve, replay: bool) -> None:
    run = resolve(args["run"])
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in args.get("metrics", [])]
    if replay and metrics:
        metrics = _not_yet_logged(client, run, metrics)
    params = [Param(k, v) for k, v in args.get("params", {}).items()]
    tags = [RunTag(k, v) for k, v in args.get("tags", {}).items()]
    if metrics or params or tags:
        client.log_batch(run, metrics=metrics, params=params, tags=tags)


def _not_yet_logged(client: MlflowClient, run: str, metrics: list[Metric]) -> list[Metric]:
    """Drop metrics whose (step, timestamp, value) is already in the run's history."""
    logged: dict[str, set[tuple[int, int, float]]] = {}
    for key in {m.key for m in metrics}:
        history = client.get_metric_history(run, key)
        logged[key] = {(h.step, h.timestamp, h.value) for h in history}
    return [m for m in metrics if (m.step, m.timestamp, m.value) not in logged[m.key]]


def _log_artifact(client: MlflowClient, run: str, path: Path, artifact_path: str | None) -> None:
    if path.is_dir():
        client.log_artifacts(run, str(path), artifact_path)
    else:
        client.log_artifact(run, str(path), artifact_path)


def _register_and_promote(
    client: MlflowClient, args: dict, resolve: Resolve, key: str
) -> PromotionDecision:
    run = resolve(args["run"])
    version = register_model(
        client, run, args["site"], args["family"], tags=args.get("version_tags"), op_key=key
    )
    return promote(
        client,
        f"{args['site']}-{args['family']}",
        version,
        metric=args["metric"],
        margin=args["margin"],
        higher_is_better=args["higher_is_better"],
        contracts_passed=args["contracts_passed"],
        diverged=args["diverged"],
        eval_set_hash=args.get("eval_set_hash"),
        floor=args.get("floor"),  # absent in spools written before the floor: the default
    )


def _replay(client: MlflowClient, record: dict, resolve: Resolve, spool: Path) -> Any:
    op, args, key = record["op"], record["args"], record["key"]
    if op == "create_run":
        return _create_run(client, args, resolve, replay=True)
    if op == "log_batch":
        return _log_batch(client, args, resolve, replay=True)
    if op == "log_artifact":
        return _log_artifact(
            client, resolve(args["run"]), spool / args["path"], args.get("artifact_path")
        )
    if op == "log_model":
        example = np.load(spool / args["example"]) if args.get("example") else None
        return log_detector_model(
            client,
            resolve(args["run"]),
            spool / args["detector_dir"],
            example,
            name=MODEL_NAME,
            op_key=key,
        )
    if op == "register_and_promote":
        return _register_and_promote(client, args, resolve, key)
    if op == "end_run":
        return client.set_terminated(resolve(args["run"]), args["status"], args["end_time"])
    raise ValueError(f"unknown spooled operation {op!r}: written by a newer vadflow?")


# --- sync ---------------------------------------------------------------------------------


@dataclass
class SyncReport:
    """What one `sync` did."""

    applied: int = 0  # operations sent to the server now
    skipped: int = 0  # operations an earlier sync had already sent
    remaining: int = 0  # operations still in the spool (server unreachable, or an error)
    archived: list[str] = field(default_factory=list)  # spool files fully replayed
    errors: list[str] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # local reference -> server run id

    @property
    def ok(self) -> bool:
        return self.remaining == 0 and not self.errors


@dataclass
class _State:
    runs: dict[str, str]
    applied: dict[str, set[str]]

    @classmethod
    def load(cls, spool: Path) -> _State:
        path = spool / STATE_FILE
        if not path.is_file():
            return cls({}, {})
        data = json.loads(path.read_text())
        applied = {k: set(v) for k, v in data.get("applied", {}).items()}
        return cls(dict(data.get("runs", {})), applied)

    def save(self, spool: Path) -> None:
        data = {"runs": self.runs, "applied": {k: sorted(v) for k, v in self.applied.items()}}
        tmp = spool / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, spool / STATE_FILE)

    def resolver(self) -> Resolve:
        def resolve(ref: str) -> str:
            if not ref.startswith(LOCAL_PREFIX):
                return ref
            try:
                return self.runs[ref]
            except KeyError:
                raise LookupError(
                    f"run {ref} was created while the server was down, but its creation has not "
                    "been replayed (an earlier error in the spool?)"
                ) from None

        return resolve


def sync(
    spool_dir: str | Path, tracking_uri: str | None = None, *, stale_after_s: float = STALE_AFTER_S
) -> SyncReport:
    """Replay the spool to `tracking_uri`, oldest file first; safe to run again at any time.

    Stops at the first unreachable-server error (what is left stays for the next sync). Any
    other error stops that file at the failing operation, named in the report, and goes on with
    the next file. Fully replayed files move to `synced/` once their session has closed (or
    its file is older than `stale_after_s`: the process that wrote it died).
    """
    configure_http()
    spool = Path(spool_dir)
    report = SyncReport()
    if not spool.is_dir():
        return report
    uri = resolve_tracking_uri(tracking_uri)
    with _exclusive(spool):
        replayer = _Replayer(MlflowClient(uri, registry_uri=uri), spool, report, stale_after_s)
        report.skipped = replayer.already_applied()
        # A file may use a run that a later-named file created while offline (sessions run
        # side by side), so files that stopped on an error are retried while others progress.
        while True:
            progress, unreachable, errors = replayer.one_pass()
            if unreachable or not progress or not errors:
                break
        report.errors.extend(errors)
        report.remaining = _count_pending(spool, replayer.state)
    return report


class _Replayer:
    def __init__(
        self, client: MlflowClient, spool: Path, report: SyncReport, stale_after_s: float
    ) -> None:
        self.client, self.spool, self.report = client, spool, report
        self.stale_after_s = stale_after_s
        self.state = _State.load(spool)
        self.resolve = self.state.resolver()

    def already_applied(self) -> int:
        return sum(
            1
            for path in _spool_files(self.spool)
            for _, record in _read(path)[0]
            if record["key"] in self.state.applied.get(path.name, set())
        )

    def one_pass(self) -> tuple[bool, bool, list[str]]:
        """Each spool file in order: (made progress, server unreachable, errors)."""
        progress, errors = False, []
        for path in _spool_files(self.spool):
            records, closed, problem = _read(path)
            if problem:
                errors.append(problem)
            done = self.state.applied.setdefault(path.name, set())
            complete = not problem
            for line, record in records:
                if record["key"] in done:
                    continue
                try:
                    result = _replay(self.client, record, self.resolve, self.spool)
                except Exception as exc:
                    if is_unreachable(exc):
                        uri = self.client.tracking_uri
                        errors.append(f"tracking server {uri} is unreachable: {exc}")
                        return progress, True, errors
                    errors.append(
                        f"{path.name} line {line} ({record['op']}): {type(exc).__name__}: {exc}"
                    )
                    complete = False
                    break
                if record["op"] == "create_run":
                    self.state.runs[record["run"]] = result
                    self.report.runs[record["run"]] = result
                done.add(record["key"])
                self.state.save(self.spool)
                self.report.applied += 1
                progress = True
            stale = time.time() - path.stat().st_mtime > self.stale_after_s
            if complete and (closed or stale):
                _archive(self.spool, path)
                self.state.applied.pop(path.name, None)
                self.state.save(self.spool)
                self.report.archived.append(path.name)
        return progress, False, errors


def pending_run_refs(spool_dir: str | Path) -> set[str]:
    """Run references with operations waiting in the spool."""
    spool = Path(spool_dir)
    if not spool.is_dir():
        return set()
    state = _State.load(spool)
    refs = set()
    for path in _spool_files(spool):
        done = state.applied.get(path.name, set())
        refs.update(r["run"] for _, r in _read(path)[0] if r["key"] not in done)
    return refs


def pending_operations(spool_dir: str | Path) -> int:
    spool = Path(spool_dir)
    return _count_pending(spool, _State.load(spool)) if spool.is_dir() else 0


def _count_pending(spool: Path, state: _State) -> int:
    total = 0
    for path in _spool_files(spool):
        done = state.applied.get(path.name, set())
        total += sum(1 for _, r in _read(path)[0] if r["key"] not in done)
    return total


def _spool_files(spool: Path) -> list[Path]:
    # Session ids start with a UTC timestamp, so name order is write order.
    return sorted(p for p in spool.glob("*.jsonl") if p.is_file())


def _read(path: Path) -> tuple[list[tuple[int, dict]], bool, str | None]:
    """(line number, operation) pairs, whether the session closed, and a problem if any.

    A torn last line (a writer died mid-line, or is writing now) is ignored; a bad line
    elsewhere stops the file there, since later lines may depend on it.
    """
    records: list[tuple[int, dict]] = []
    closed = False
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            return records, closed, f"{path.name} line {number}: not valid JSON; fix or remove it"
        op = record.get("op")
        closed = op == CLOSE_OP  # the session closed its file if nothing came after
        if op not in (CLOSE_OP, "open"):
            records.append((number, record))
    return records, closed, None


def _archive(spool: Path, path: Path) -> None:
    synced = spool / "synced"
    (synced / "files").mkdir(parents=True, exist_ok=True)
    files = spool / "files" / path.stem
    if files.exists():
        os.replace(files, synced / "files" / path.stem)
    os.replace(path, synced / path.name)


@contextlib.contextmanager
def _exclusive(spool: Path) -> Iterator[None]:
    with open(spool / ".sync.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another `vadflow tracking sync` is replaying {spool}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key() -> str:
    return uuid.uuid4().hex
