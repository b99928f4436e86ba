"""Dependencies match use: what setup.py requires, what megarch imports, what a user sees.

- megatron-core is the ``megatron`` extra: no module of megarch or kernels imports it, and
  importing all of them leaves it unloaded;
- ``import megarch`` and every console command's and tool's ``--help`` print nothing on stderr
  (no dependency warnings) under a user's default warning filters;
- setup.py's ``torch>=`` is the minimum the README states, and the installed torch meets it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
TOOLS = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)  # a user's defaults
    return env


def _console_scripts() -> list[tuple[str, str, str]]:
    """(command, module, function) of every console script setup.py declares."""
    found = re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', SETUP)
    assert len(found) >= 6, "setup.py's console_scripts not found"
    return found


def _install_requires() -> list[str]:
    block = re.search(r"install_requires=\[(.*?)\n    \]", SETUP, re.S).group(1)
    return re.findall(r'^\s*"([^"]+)"', block, re.M)


def _library_modules() -> list[str]:
    names = []
    for package in ("megarch", "kernels"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3]
                    names.append(rel.replace(os.sep, ".").removesuffix(".__init__"))
    return sorted(names)


def test_megatron_core_is_an_extra_that_no_library_module_imports():
    assert not any(r.startswith("megatron") for r in _install_requires())
    assert re.search(r'"megatron": \["megatron-core', SETUP)
    for module in _library_modules():
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        if not os.path.exists(path):
            path = os.path.join(ROOT, *module.split("."), "__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "megatron" for n in names), (module, names)


def test_importing_every_library_module_is_silent_and_loads_no_megatron():
    modules = [m for m in _library_modules() if not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'megatron' not in sys.modules, 'megatron-core was imported'\n"
        "print(len(sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr


@pytest.mark.parametrize("command,module,function", _console_scripts(),
                         ids=[c for c, _, _ in _console_scripts()])
def test_console_command_help_prints_no_warnings(command, module, function):
    code = (f"import sys; sys.argv = [{command!r}, '--help']; "
            f"from {module} import {function} as main; sys.exit(main())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout
    assert run.stderr == ""


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help_prints_no_warnings(tool):
    run = subprocess.run([sys.executable, os.path.join("tools", tool), "--help"],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout
    assert run.stderr == ""


def test_bench_data_without_megatron_core_says_how_to_install_it(monkeypatch, capsys):
    from tools import bench_data

    monkeypatch.setitem(sys.modules, "megatron", None)  # as if not installed
    monkeypatch.setattr(sys, "argv", ["bench_data.py", "--dir", "/nonexistent/never-written"])
    with pytest.raises(SystemExit) as exit_info:
        bench_data.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "megatron-core" in err and "pip install -e '.[megatron]'" in err
    assert not os.path.exists("/nonexistent/never-written")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", text).groups())


def test_torch_minimum_is_stated_in_the_readme_and_met():
    import torch

    minimum = re.search(r'"torch>=([\d.]+)"', SETUP).group(1)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"torch >= {minimum}" in readme, "README must state setup.py's torch minimum"
    assert _version(torch.__version__) >= _version(minimum)
    # the APIs that set the minimum exist where megarch calls them
    assert callable(torch.nn.utils.get_total_norm)
    assert callable(torch.nn.utils.clip_grads_with_norm_)
