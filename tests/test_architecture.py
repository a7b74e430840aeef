"""The boundaries docs/architecture.md draws, checked: imports run one way (mmdet_mlflow ->
mlflow_model -> scoring), a saved model carries only the serving core, and the lists that the
CLI, the components and the pipeline offer come from the one place that owns them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (inside functions too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def outward_imports(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for line, module in imported_modules(path)
            if module.split(".")[0] in forbidden]


def test_the_serving_core_imports_neither_the_flavor_nor_the_tooling():
    assert outward_imports("scoring", ("mlflow_model", "mmdet_mlflow")) == []


def test_the_flavor_does_not_import_the_tooling():
    assert outward_imports("mlflow_model", ("mmdet_mlflow",)) == []


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from mlflow_model.checkpoints import x\n    import mmdet_mlflow.cli\n")
    assert [m for _, m in imported_modules(module)] == ["os", "mlflow_model.checkpoints", "mmdet_mlflow.cli"]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_onnx_model_dir"])
def test_a_saved_model_carries_only_the_serving_core(fixture, request):
    """code/ holds scoring/ alone: no exporter, quantizer or checkpoint downloader (they are
    mlflow_model's), no tooling; the MLmodel loads through scoring.pyfunc."""
    model = request.getfixturevalue(fixture)
    code = model / "code"
    assert sorted(p.name for p in code.iterdir()) == ["scoring"]
    shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*.py"))
    assert shipped == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scoring").rglob("*.py"))
    assert not [p for p in shipped if any(word in p for word in ("export", "quantiz", "checkpoint"))]
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "scoring.pyfunc"


def test_component_and_pipeline_runtime_choices_are_the_runtimes():
    """The runtime list lives in scoring.runtimes; the specs must offer exactly it."""
    from scoring.runtimes import RUNTIMES

    for spec in ("components/package/spec.yaml", "components/finetune/spec.yaml"):
        enum = yaml.safe_load((ROOT / spec).read_text())["inputs"]["runtime"]["enum"]
        assert list(enum) == list(RUNTIMES), spec


def test_cli_runtime_choices_are_the_runtimes(capsys):
    from mmdet_mlflow.cli import build_parser
    from scoring.runtimes import RUNTIMES

    for command in ("package", "finetune"):
        with pytest.raises(SystemExit):
            build_parser((command,)).parse_args([command, "--help"])
        assert "{" + ",".join(RUNTIMES) + "}" in capsys.readouterr().out, command
