"""Mask presets are data: site validation reads them without the masking code or torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from vadflow.tasks.site import TilingConfig
from vadflow.tasks.tiling import mask, presets

# Run in a fresh interpreter, so modules imported by other tests cannot hide an import.
PROBE = """
import json, sys
from vadflow.tasks.site import load_site
site = load_site(sys.argv[1])
loaded = [m for m in ("torch", "vadflow.tasks.tiling.mask", "scipy", "skimage") if m in sys.modules]
print(json.dumps({"preset": site.tiling.mask_preset, "loaded": loaded}))
"""


def test_loading_a_site_imports_neither_torch_nor_the_masking_code(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(
        "domain: pathology\ntiling:\n  mask_preset: he-faint\nfamilies: [ae_l2, patch_knn]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"preset": "he-faint", "loaded": []}


def test_an_unknown_preset_fails_site_validation_naming_the_known_ones() -> None:
    with pytest.raises(ValidationError) as error:
        TilingConfig(mask_preset="h&e")
    message = str(error.value)
    assert "unknown mask preset 'h&e'" in message
    for name in presets.MASK_PRESETS:
        assert name in message


def test_tiling_reads_the_same_presets_the_site_is_checked_against() -> None:
    assert mask.MASK_PRESETS is presets.MASK_PRESETS
    assert mask.mask_preset("ihc") is presets.MASK_PRESETS["ihc"]
    assert set(presets.DEFAULT_PRESET.values()) <= set(presets.MASK_PRESETS)
