"""MLflow tracking: what runs carry (`mlflow_runs`), the detector as an MLflow model
(`pyfunc`), the registry and champion gate (`registry`), logging that survives an outage
(`spool`), system metrics (`system_metrics`), cross-run comparison (`compare`, `plots`), and
what a nightly run logs (`nightly`). Modules are imported by name; this package imports nothing.
"""
