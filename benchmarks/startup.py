"""How long `vadflow run` waits before it does any work, and what its imports cost.

    .venv/bin/python benchmarks/startup.py                          # this tree
    .venv/bin/python benchmarks/startup.py --baseline /path/to/old  # and an older tree, same run

For each tree (a checkout whose root is the `vadflow` package; the baseline is put first on
PYTHONPATH, so its folder must be named `vadflow`) it measures, in fresh processes:

- import CPU-s: CPU seconds (user + system) a new interpreter spends importing what the command
  line imports before it calls the flow (`vadflow.flows.cli`, then the nightly flow module);
- launch -> first task: wall seconds from starting `vadflow run` on a tiny synthetic site (one
  family, one epoch, a fresh state folder) to the start time Prefect recorded for the run's
  first task (read from Prefect's SQLite database afterwards);
- run wall / run CPU: the whole run's wall seconds, and CPU seconds of the run and every process
  it started and waited for (the Prefect server, tiling workers);
- peak RSS of the largest process among them.

Repeat with `--repeats N` on a busy machine; the table shows the median.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
IMPORT_PROBE = (
    "import resource, time\n"
    "import vadflow.flows.cli\n"
    "import vadflow.flows.nightly\n"
    "u = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(u.ru_utime + u.ru_stime)\n"
)
RUN_CLI = "import sys; from vadflow.flows.cli import app; sys.argv[0] = 'vadflow'; app()"


def _env(tree: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree.parent)  # `import vadflow` resolves to this tree
    env["VADFLOW_HOME"] = str(home)
    env["PREFECT_HOME"] = str(home / "prefect")
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)  # the embedded default is what a newcomer gets
    return env


def import_cpu_seconds(tree: Path, scratch: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        env=_env(tree, scratch),
        capture_output=True,
        text=True,
        check=True,
        cwd=scratch,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _first_task_start(prefect_home: Path) -> datetime:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        (value,) = db.execute(
            "SELECT min(start_time) FROM task_run WHERE start_time IS NOT NULL"
        ).fetchone()
    if value is None:
        raise RuntimeError(f"no task run recorded in {prefect_home / 'prefect.db'}")
    started = datetime.fromisoformat(str(value).replace(" ", "T"))
    return started if started.tzinfo else started.replace(tzinfo=UTC)


def run_once(tree: Path, site: Path, scratch: Path, family: str) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="home-", dir=scratch))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = datetime.now(UTC)
    clock = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "run", str(site), "--family", family, "--epochs", "1"],
        env=_env(tree, home),
        capture_output=True,
        text=True,
        cwd=scratch,
    )
    wall = time.monotonic() - clock
    if done.returncode != 0:
        raise RuntimeError(f"vadflow run failed in {tree}:\n{done.stdout[-3000:]}{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    first = (_first_task_start(home / "prefect") - launched).total_seconds()
    return {
        "first_task_s": first,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mib": after.ru_maxrss / 1024,
    }


def make_site(scratch: Path) -> Path:
    from vadflow.tasks.synth.pathology import make_pathology_site

    return make_pathology_site(
        scratch / "data",
        "startup",
        n_train_normal=2,
        n_test_normal=1,
        n_test_tumor=1,
        width=2048,
        height=1536,
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="an older tree to measure in the same run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--family", default="ae_l2")
    args = parser.parse_args()
    trees = {"this tree": HERE}
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        if baseline.name != "vadflow" or not (baseline / "__init__.py").exists():
            parser.error(f"--baseline {baseline}: give a checkout folder named 'vadflow'")
        trees = {"baseline": baseline, **trees}
    scratch = Path(tempfile.mkdtemp(prefix="vadflow-startup-"))
    site = make_site(scratch)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():  # interleaved, so load affects both alike
            sample = run_once(tree, site, scratch, args.family)
            sample["import_cpu_s"] = import_cpu_seconds(tree, scratch)
            rows[name].append(sample)
    header = ("tree", "import CPU-s", "launch->first task s", "run wall s", "run CPU-s", "peak MiB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, samples in rows.items():

        def median(key: str, samples: list[dict[str, float]] = samples) -> float:
            return statistics.median(s[key] for s in samples)

        print(
            f"{name} | {median('import_cpu_s'):.1f} | {median('first_task_s'):.1f} | "
            f"{median('wall_s'):.1f} | {median('cpu_s'):.1f} | {median('peak_rss_mib'):.0f}"
        )
    print(f"({args.repeats} run(s) each, median; {os.cpu_count()} cores; site {site})")


if __name__ == "__main__":
    main()
