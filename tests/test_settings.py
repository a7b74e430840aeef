"""One settings module, read at use, documented once."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from scoring import settings

ROOT = Path(__file__).resolve().parent.parent


def test_docs_table_is_the_settings_module():
    assert settings.markdown_table() in (ROOT / "docs" / "settings.md").read_text()


def test_every_variable_the_code_names_is_a_setting():
    """No module reads an MMDET_MLFLOW_* variable of its own (they would drift and freeze)."""
    known = {s.env for s in settings.SETTINGS}
    for package in ("scoring", "mlflow_model", "mmdet_mlflow"):
        for path in (ROOT / package).rglob("*.py"):
            for name in re.findall(r"MMDET_MLFLOW_[A-Z_]+", path.read_text()):
                assert name in known, f"{path.relative_to(ROOT)} names {name}, not in scoring/settings.py"


def test_read_at_use_and_errors_name_the_variable(monkeypatch):
    monkeypatch.delenv(settings.MAX_IMAGE_PIXELS.env, raising=False)
    assert settings.MAX_IMAGE_PIXELS.value() == 50_000_000
    monkeypatch.setenv(settings.MAX_IMAGE_PIXELS.env, "1000")
    assert settings.MAX_IMAGE_PIXELS.value() == 1000
    monkeypatch.setenv(settings.MAX_IMAGE_PIXELS.env, "lots")
    with pytest.raises(settings.SettingError, match="MMDET_MLFLOW_MAX_IMAGE_PIXELS='lots'"):
        settings.MAX_IMAGE_PIXELS.value()
    monkeypatch.setenv(settings.BATCH_PARAMS.env, "[1]")
    with pytest.raises(settings.SettingError, match="MMDET_MLFLOW_BATCH_PARAMS"):
        settings.BATCH_PARAMS.value()
    monkeypatch.setenv(settings.URL_ALLOWLIST.env, " a.example , 10.0.0.0/8,")
    assert settings.URL_ALLOWLIST.value() == ("a.example", "10.0.0.0/8")
