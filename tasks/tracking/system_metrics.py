"""System metrics (CPU, memory, disk, network, GPU) for a run, where the machine allows.

MLflow's own collectors (they need `psutil`; the GPU one needs `pynvml`) are sampled in a
background thread, and the samples are logged through a `TrackingSession`, so an outage spools
them like any other metric. MLflow's built-in monitor cannot do that: it stops at the first
failed call and needs the run to be mlflow's active run. Without psutil this is a no-op.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from mlflow.entities import Metric

from vadflow.tasks.tracking.mlflow_runs import now_ms

logger = logging.getLogger(__name__)

PREFIX = "system/"  # the dashboard's "System metrics" tab groups these


def collectors() -> list[Any]:
    """MLflow's system-metric collectors available here; empty without psutil."""
    try:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    except ImportError:  # psutil missing
        return []
    found: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        found.append(GPUMonitor())
    except Exception:  # no pynvml or no NVIDIA driver: no GPU metrics, nothing else changes
        logger.debug("no GPU system metrics", exc_info=True)
    return found


class SystemMetrics:
    """Context manager: sample every `interval` seconds while the block runs; log each sample
    (averaged over `samples_per_step` readings) as one step of `system/...` metrics."""

    def __init__(
        self, session: Any, run: str, interval: float = 10.0, samples_per_step: int = 1
    ) -> None:
        self.session = session
        self.run = run
        self.interval = interval
        self.samples_per_step = max(1, samples_per_step)
        self.monitors = collectors()
        self.steps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return bool(self.monitors)

    def __enter__(self) -> SystemMetrics:
        if self.available:
            self._thread = threading.Thread(target=self._loop, name="vadflow-sysmetrics")
            self._thread.daemon = True
            self._thread.start()
        else:
            logger.info("psutil is not installed: no system metrics for run %s", self.run)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._publish()  # whatever was sampled since the last step

    def sample(self) -> None:
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
            except Exception:  # one failing collector must not end the others
                logger.debug("system metric collector %s failed", monitor, exc_info=True)

    def _loop(self) -> None:
        while True:
            for _ in range(self.samples_per_step):
                self.sample()
                if self._stop.wait(self.interval):
                    return
            self._publish()

    def _publish(self) -> None:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            if monitor.metrics:
                try:
                    values.update(monitor.aggregate_metrics())
                except Exception:
                    logger.debug("system metric aggregation failed", exc_info=True)
                monitor.clear_metrics()
        if not values:
            return
        now = now_ms()
        metrics = [Metric(f"{PREFIX}{k}", float(v), now, self.steps) for k, v in values.items()]
        try:
            self.session.log_metric_series(self.run, metrics)
        except Exception:  # system metrics are best effort; the run's own logging goes on
            logger.warning("could not log system metrics for run %s", self.run, exc_info=True)
        self.steps += 1
