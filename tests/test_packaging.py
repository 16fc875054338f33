"""Packaging promises: environment.yml and pyproject list the same dependencies; layout exists."""

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    for sep in "<>=!~[ ;":
        req = req.split(sep)[0]
    return req.strip().lower()


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {r.replace(" ", "") for r in py["dependencies"] + py["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert listed == wanted, (
        f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    )


def test_design_card_layout():
    for d in ["notebooks", "vlmlab", "data_prep", "figures", "tests", "environment.yml", "README.md"]:
        assert (ROOT / d).exists(), d
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_notebooks_have_tagged_parameters_cell():
    import nbformat

    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(nbs) >= 5
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), p.name
        assert 'preset = "smoke"' in code[0].source, p.name
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), p.name
        assert all(not c.get("outputs") for c in code), f"{p.name} has committed outputs"
