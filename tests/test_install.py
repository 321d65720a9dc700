"""What gets installed: only `ibot_*` top-level names, beside Hugging Face `transformers` 5 and its `kernels`.

The repository's folders are `engine/`, `kernels/` and `benchmarks/`; pyproject.toml installs them as `ibot_engine`,
`ibot_kernels` and `ibot_benchmarks`. Before, they installed under the folder names, and Hugging Face's own `kernels`
(a dependency of transformers 5) collided with ours: after an editable install `ibot train` died at import, after
`pip install .` one package's `kernels/__init__.py` overwrote the other's.

The `install` tests (marked slow, run by .ci/run) install a copy of the project into fresh virtual environments,
editable and not, together with `transformers>=5` from the package index, and run the console script from another
directory: `ibot train` for 2 steps and `ibot eval knn` on `builtin:digits`, and (the non-editable install, whose demo
config must ship inside the package) `ibot demo train.steps=5`. Then Hugging Face's `kernels.get_kernel` still
imports, and no top-level `engine`, `kernels` (of ours) or `benchmarks` exists.

To keep CI within its time, the fresh environments do not download and unpack torch again (5.6 GB, about 90 s each):
a `.pth` file puts a folder of links to the test runner's installed distributions, minus this project's own, at the end
of `sys.path`. pip resolves against them like any installed distribution (it never removes what lies outside the
environment), and installs everything else (transformers, kernels, tokenizers, ...) into the fresh environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"engine": "ibot_engine", "kernels": "ibot_kernels", "benchmarks": "ibot_benchmarks"}
OURS = set(FOLDERS.values())

# Run inside the fresh environment: what ibot-engine installed, and what the generic names resolve to.
PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys
found = {}
for name in ("engine", "kernels", "benchmarks"):
    spec = importlib.util.find_spec(name)
    found[name] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
ours = sorted({top for top, dists in md.packages_distributions().items() if "ibot-engine" in dists
               and not top.startswith("__editable__")})
mapping = {}
for path in sys.path:  # an editable install maps the names in its finder module
    for finder in sorted(__import__("pathlib").Path(path or ".").glob("__editable___ibot_engine_*_finder.py")):
        ns = {}
        exec(compile(finder.read_text(), str(finder), "exec"), ns)
        mapping.update(ns.get("MAPPING", {}))
import kernels
from ibot_kernels import centered_softmax_cross_entropy
print(json.dumps({"found": found, "ours": ours, "mapping": sorted(mapping),
                  "hf_kernels": md.packages_distributions().get("kernels", []),
                  "get_kernel": callable(getattr(kernels, "get_kernel", None)),
                  "transformers": md.version("transformers")}))
"""


def _project_packages() -> set[str]:
    """Import names of every package folder (a folder with __init__.py) of the repository."""
    names = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            names.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    return names


def test_pyproject_lists_every_package():
    """setuptools cannot find packages through a folder mapping, so pyproject.toml lists them: the list must be the
    folders, or an install silently lacks a subpackage (which an editable install would hide)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    assert set(tool["packages"]) == _project_packages()
    assert "ibot_engine.configs" in tool["package-data"]


def _copy_project(dest: Path) -> Path:
    """The project's files (tracked and untracked, not ignored) as a clean source tree, as a user's clone is."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def shared_deps(tmp_path_factory) -> Path:
    """A folder of links to the test runner's installed distributions, without this project's own."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path_factory.mktemp("shared_site_packages")
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("__editable__", "ibot_engine", "ibot-engine")) or entry.suffix == ".pth":
            continue
        (farm / entry.name).symlink_to(entry)
    return farm


def _venv(path: Path, shared: Path) -> tuple[Path, dict[str, str]]:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "zz_shared_deps.pth").write_text(f"{shared}\n")  # after the environment's own packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{path / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="0")
    return python, env


def _run(cmd: list, cwd: Path, env: dict[str, str], timeout: int) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.install
@pytest.mark.parametrize("editable", [True, False], ids=["editable", "wheel"])
def test_installs_beside_transformers_and_hugging_face_kernels(tmp_path, shared_deps, editable):
    import json

    project = _copy_project(tmp_path / "project")
    python, env = _venv(tmp_path / "venv", shared_deps)
    target = ["-e", f"{project}[digits]"] if editable else [f"{project}[digits]"]
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--disable-pip-version-check",
          *target, "transformers>=5"], tmp_path, env, 900)

    elsewhere = tmp_path / "elsewhere"  # not the project: nothing resolves through the working directory
    elsewhere.mkdir()
    probe = json.loads(_run([python, "-c", PROBE], elsewhere, env, 300).splitlines()[-1])
    assert int(probe["transformers"].split(".")[0]) >= 5, probe["transformers"]  # a number: "10" < "5" as text
    assert probe["get_kernel"], "Hugging Face's kernels.get_kernel is gone"
    assert probe["hf_kernels"] == ["kernels"], f"top-level `kernels` claimed by {probe['hf_kernels']}"
    assert probe["found"]["engine"] is None and probe["found"]["benchmarks"] is None, probe["found"]
    assert set(probe["ours"]) <= OURS and set(probe["mapping"]) <= OURS, probe
    assert set(probe["ours"]) | set(probe["mapping"]) == OURS, probe

    ibot = tmp_path / "venv" / "bin" / "ibot"
    demo = _run([python, "-c", "from ibot_engine.configs import DEMO_CONFIG; print(DEMO_CONFIG)"], elsewhere, env,
                120).strip()
    assert Path(demo).is_relative_to(project) == editable, demo  # the wheel's config is its own copy
    _run([ibot, "train", "--config", demo, "train.steps=2", "train.log_every=1", "run.dir=run", "eval.knn_every=0",
          "checkpoint.every=2"], elsewhere, env, 600)
    out = _run([ibot, "eval", "knn", "--checkpoint", "run", "--out", "knn.json"], elsewhere, env, 600)
    assert "k-NN top-1" in out and json.loads((elsewhere / "knn.json").read_text())["top1"] >= 0
    if not editable:  # the demo's config ships with the package: `ibot demo` from any directory
        out = _run([ibot, "demo", "train.steps=5"], elsewhere, env, 900)
        assert "k-NN top-1 before" in out and (elsewhere / "runs" / "demo" / "loss.png").is_file()
