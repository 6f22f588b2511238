"""Run-time dependencies: everything the engine imports (function-level imports included) is either
the standard library, a run-time requirement of setup.py, or an optional acceleration behind its
adapter, declared as an extra. A plain ``pip install .`` therefore runs every recipe."""

from __future__ import annotations

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "megatron": "megatron-core", "flash_attn": "flash-attn"}
OPTIONAL = {"flash_attn"}  # tried inside try/except ImportError, with a plain path always available


def setup_lists() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires names, extras -> names) read from setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}

    def name(req: str) -> str:
        return re.split(r"[<>=!;\s\[]", req, maxsplit=1)[0].lower()

    return {name(r) for r in kw["install_requires"]}, {e: {name(r) for r in rs} for e, rs in kw["extras_require"].items()}


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files of engine/ and kernels/ that import it (anywhere in the file)."""
    out: dict[str, set[str]] = {}
    for package in ("engine", "kernels"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(folder, f)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names = [node.module]
                    else:
                        continue
                    for n in names:
                        out.setdefault(n.split(".")[0], set()).add(os.path.relpath(path, ROOT))
    return out


def test_every_import_is_a_runtime_requirement_or_an_optional_extra():
    required, extras = setup_lists()
    optional = set().union(*extras.values())
    local = {"engine", "kernels", "tools"}
    bad = []
    for module, files in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module in local:
            continue
        dist = DISTRIBUTION.get(module, module).lower()
        if module in OPTIONAL:
            if dist not in optional:
                bad.append(f"{module} (optional) is in no extra of setup.py")
        elif dist not in required:
            bad.append(f"{module} ({dist}) imported by {sorted(files)[:3]} is not in install_requires")
    assert not bad, "\n".join(bad)


def test_tokenizer_directories_need_no_extra():
    required, extras = setup_lists()
    assert "transformers" in required and "transformers" not in extras.get("dev", set())
