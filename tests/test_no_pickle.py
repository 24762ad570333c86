"""No pickle on any load path: recipes (JSON + safetensors), tuning databases (JSON lines),
compiled modules' metadata (JSON) and the tools' inputs. Read from the source (AST): no module
of the project imports a pickle-based serializer, every ``torch.load`` passes
``weights_only=True`` and every ``np.load`` ``allow_pickle=False``."""

from __future__ import annotations

import ast

import pytest

from tests.test_layers import PACKAGES, ROOT

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def _violations(source: str, name: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, filename=name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            out.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner = owner.id if isinstance(owner, ast.Name) else ""
            if (owner, node.func.attr) == ("torch", "load") and \
                    _keyword(node, "weights_only") is not True:
                out.append(f"{where}: torch.load without weights_only=True")
            if (owner, node.func.attr) in (("np", "load"), ("numpy", "load")) and \
                    _keyword(node, "allow_pickle") is not False:
                out.append(f"{where}: np.load without allow_pickle=False")
    return out


def test_no_pickle_in_the_project():
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found += _violations(path.read_text(), str(path.relative_to(ROOT)))
    assert found == []


@pytest.mark.parametrize("code", ["import pickle", "from cloudpickle import loads",
                                  "import torch\ntorch.load('f')",
                                  "import numpy as np\nnp.load('f', allow_pickle=True)"])
def test_the_scan_sees_each_form(code):
    assert _violations(code, "x.py")
