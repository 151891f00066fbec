"""Site files: one YAML per hospital or production line, validated before anything deploys.

A site file is a site's configuration (what the nightly flow needs: domain, source, tiling,
detector families) plus how it is operated: schedule, work pool, concurrency, promotion rule and
what a contract failure does. `vadflow sites check` validates every file and says, per file,
which field is wrong and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect.client.schemas.schedules import CronSchedule
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vadflow.tasks.site import SiteConfig, read_yaml_mapping

SITES_DIR = Path(__file__).parent / "sites"
LOCAL_POOL = "vadflow-process"  # created on first deploy; any other pool must exist
JOB_KINDS = ("nightly", "batch-score")
ENTRYPOINTS = {
    "nightly": "flows/nightly.py:nightly",
    "batch-score": "flows/batch_score.py:batch_score",
}


class ScheduleSpec(BaseModel):
    """A cron line in an IANA timezone: nightly at 02:00 local time survives DST changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        try:
            CronSchedule(cron=value)
        except ValueError as exc:
            raise ValueError(f"bad cron expression {value!r}: {_first_line(exc)}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            CronSchedule(cron="0 0 * * *", timezone=value)
        except ValueError:
            raise ValueError(
                f"unknown timezone {value!r}: use an IANA name such as Europe/Amsterdam"
            ) from None
        return value

    def to_prefect(self) -> CronSchedule:
        return CronSchedule(cron=self.cron, timezone=self.timezone)


class PoolSpec(BaseModel):
    """Where runs execute; job variables must exist in the pool's base job template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = LOCAL_POOL
    queue: str | None = None
    job_variables: dict[str, object] = Field(default_factory=dict)


class SiteFile(SiteConfig):
    """A site's configuration plus how it is scheduled and operated."""

    schedule: ScheduleSpec
    jobs: list[Literal["nightly", "batch-score"]] = Field(default_factory=lambda: ["nightly"])
    work_pool: PoolSpec = Field(default_factory=PoolSpec)
    concurrency_limit: int = Field(1, ge=1)
    tags: list[str] = Field(default_factory=list)

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        if value.startswith("s3://"):
            if len(value) <= len("s3://") or value[5] == "/":
                raise ValueError(f"source {value!r} names no bucket: use s3://bucket/prefix")
            return value
        if not Path(value).expanduser().is_dir():
            raise ValueError(f"source folder {value!r} does not exist")
        return value

    def site_config(self) -> SiteConfig:
        """Just the part the flows consume, as a plain SiteConfig."""
        return SiteConfig.model_validate(self.model_dump(include=set(SiteConfig.model_fields)))


class SiteFileError(ValueError):
    """A site file that does not validate; the message lists every bad field."""


def load_site_file(path: str | Path) -> SiteFile:
    path = Path(path)
    try:
        data = read_yaml_mapping(path)  # bounded: size, aliases, values, depth
    except ValueError as exc:
        raise SiteFileError(str(exc)) from None
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise SiteFileError(f"{path.name}: name {data['name']!r} must match the file name")
    try:
        return SiteFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SiteFileError(f"{path.name}: {problems}") from None


def check_site_files(folder: str | Path = SITES_DIR) -> tuple[list[SiteFile], list[str]]:
    """Every site file in `folder`: the valid ones, and one message per invalid one."""
    sites, errors = [], []
    paths = sorted(Path(folder).glob("*.yaml")) + sorted(Path(folder).glob("*.yml"))
    if not paths:
        errors.append(f"no site files (*.yaml) in {folder}")
    for path in paths:
        try:
            sites.append(load_site_file(path))
        except SiteFileError as exc:
            errors.append(str(exc))
    return sites, errors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
