"""Settings files are read with limits: a hostile site.yaml fails in milliseconds, naming the
file, the line and the limit, and never prints the value it would have expanded to."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from vadflow.deployments.sites import SiteFileError, load_site_file
from vadflow.tasks.site import MAX_CONFIG_BYTES, load_site, read_yaml_mapping


def billion_laughs(levels: int = 9) -> str:
    """Nine levels of nine aliases: 539 bytes that expand to 9**9 (387 million) strings."""
    lines = ['a0: &a0 ["lol"]']
    for level in range(1, levels + 1):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append(f"families: *a{levels}")
    return "\n".join(lines) + "\n"


def _site(tmp_path: Path, text: str | bytes) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    path = site / "site.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return site


def test_an_alias_bomb_is_refused_at_once_naming_the_file_and_line(tmp_path: Path) -> None:
    text = billion_laughs()
    assert len(text) < 600
    site = _site(tmp_path, text)
    started = time.monotonic()
    with pytest.raises(ValueError) as caught:
        load_site(site)
    assert time.monotonic() - started < 2.0
    message = str(caught.value)
    assert str(site / "site.yaml") in message and "line " in message
    assert "more than 64 aliases" in message and "lol" not in message
    assert len(message.splitlines()) == 1 and len(message) < 300


@pytest.mark.parametrize(
    "text, limit",
    [
        ("x: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels"),
        ("x: [" + ", ".join(["1"] * 100_001) + "]\n", "more than 100,000 values"),
    ],
    ids=["deep", "wide"],
)
def test_deep_or_huge_structures_are_refused(tmp_path: Path, text: str, limit: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=limit):
        read_yaml_mapping(path)


def test_a_file_too_large_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    with path.open("wb") as handle:  # 41 MB, as in the report: sparse, nothing is parsed
        handle.truncate(41 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"more than a settings file's {MAX_CONFIG_BYTES:,}"):
        read_yaml_mapping(path)
    assert time.monotonic() - started < 0.5


def test_a_few_anchors_as_people_use_them_still_load(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        "name: s\ndomain: pathology\nshared: &shared {epochs: 3}\n"
        "detectors: {ae_l2: *shared, vae: *shared}\n"
    )
    assert read_yaml_mapping(path)["detectors"] == {"ae_l2": {"epochs": 3}, "vae": {"epochs": 3}}


def test_site_files_for_deployments_have_the_same_limits(tmp_path: Path) -> None:
    path = tmp_path / "hospital-x.yaml"
    path.write_text(billion_laughs())
    with pytest.raises(SiteFileError, match="more than 64 aliases"):
        load_site_file(path)


def test_the_cli_answers_an_alias_bomb_in_seconds(tmp_path: Path) -> None:
    site = _site(tmp_path, billion_laughs())
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from vadflow.flows.cli import app; app()", "run", str(site)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert time.monotonic() - started < 10  # interpreter start included, on a loaded machine
    assert done.returncode == 2, done.stdout + done.stderr
    output = (done.stdout + done.stderr).strip()
    assert "site.yaml" in output and "aliases" in output and "lol" not in output


def test_a_setting_given_twice_is_refused_naming_its_line(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently; a site file may not."""
    path = tmp_path / "site.yaml"
    path.write_text("name: s\ndomain: pathology\nfroc_itc_um: 10\nfroc_itc_um: 275\n")
    with pytest.raises(ValueError, match=r"line 4, column 1: not valid YAML \(the key "):
        read_yaml_mapping(path)
    merged = tmp_path / "merged.yaml"  # a `<<` merge may be overridden, as YAML means it
    merged.write_text("base: &b {epochs: 3, lr: 0.1}\nae: {<<: *b, epochs: 5}\n")
    assert read_yaml_mapping(merged)["ae"] == {"epochs": 5, "lr": 0.1}
