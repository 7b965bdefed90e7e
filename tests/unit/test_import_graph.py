"""lowrank's import graph (lowrank.codegraph, read from the source with ast): no import circle, at most three
imports between its own modules inside functions, and code fingerprints that follow a script's imports."""

from __future__ import annotations

from pathlib import Path

from lowrank.codegraph import PACKAGE, closure, code_fingerprint, cycles, import_graph, imported_modules

SCRIPTS = PACKAGE.parent / "scripts"
MAX_FUNCTION_LEVEL = 3


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "lowrank"
    pkg.mkdir(parents=True)
    for name, text in files.items():
        (pkg / name).write_text(text)
    return pkg


def test_the_reader_sees_relative_absolute_and_function_level_imports(tmp_path: Path) -> None:
    pkg = _package(tmp_path, {"__init__.py": "", "a.py": "from .b import x\nimport lowrank.c\n",
                              "b.py": "def f():\n    from lowrank import a\n    import numpy\n",
                              "c.py": "from . import b\n", "d.py": "import os\n"})
    edges, function_level = import_graph(pkg)
    assert edges == {"__init__": set(), "a": {"b", "c"}, "b": {"a"}, "c": {"b"}, "d": set()}
    assert function_level == [("b", "a", 2)]
    assert cycles(edges) == [["a", "b", "c"]]
    assert closure({"c"}, edges) == {"a", "b", "c"}
    assert closure({"d"}, edges) == {"d"}


def test_lowrank_has_no_import_circle() -> None:
    edges, _ = import_graph()
    assert len(edges) >= 36  # every module was read
    assert edges["streaming"] >= {"blocks", "gradients", "scoring"}
    assert "calibration" not in closure({"blocks"}, edges)  # the engine sits below the stages that use it
    assert cycles(edges) == []


def test_at_most_three_function_level_imports_between_lowrank_modules() -> None:
    _, function_level = import_graph()
    assert len(function_level) <= MAX_FUNCTION_LEVEL, function_level
    # the two that remain keep a cheap import cheap: `import lowrank` registers the HF quantizer only once
    # transformers is imported; `lowrank --help` imports neither torch nor transformers
    assert {(m, t) for m, t, _ in function_level} == {("__init__", "hf_format"), ("cli", "export")}


def test_a_script_reaches_its_imports_and_its_adapters() -> None:
    edges, _ = import_graph()
    allocate = imported_modules(SCRIPTS / "allocate.py")
    assert {"allocation", "statistics", "runtime"} <= allocate  # statistics and runtime through _adapter
    # progressive allocation (allocation_stages) re-scores with a gradient pass, so the allocate script reaches the
    # gradient engine through scoring: an edit there reruns the allocate jobs too (a staged job's result depends on
    # it); it still does not reach the statistics' collectors
    assert {"scoring", "gradients", "blocks"} <= closure(allocate, edges)
    assert not {"calibration", "sensitivity"} & closure(allocate, edges)
    # the statistics' collectors, through the registry of lowrank.calibration
    assert {"sensitivity", "output_metric", "blocks", "gradients"} <= closure(imported_modules(
        SCRIPTS / "calibration_stats.py"), edges)
    # reading statistics does not reach the code that collects them
    assert not {"calibration", "gradients", "blocks"} & closure(imported_modules(SCRIPTS / "summarize.py"), edges)


def test_code_fingerprint_changes_with_a_reached_module_only(tmp_path: Path) -> None:
    pkg = _package(tmp_path, {"__init__.py": "", "a.py": "from .b import x\n", "b.py": "x = 1\n",
                              "c.py": "y = 2\n"})
    script = tmp_path / "scripts" / "s.py"
    script.parent.mkdir()
    script.write_text("from helper import z\n")
    (script.parent / "helper.py").write_text("from lowrank.a import x\nz = x\n")
    before = code_fingerprint(script, pkg)
    (pkg / "c.py").write_text("y = 3\n")  # not reached
    assert code_fingerprint(script, pkg) == before
    (pkg / "b.py").write_text("x = 2\n")  # reached through the helper and a
    assert code_fingerprint(script, pkg) != before
