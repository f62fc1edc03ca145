"""The walls between the three packages, read from the source: imports go down only, side effects stay in compat.

tiekd (the method, torch only) <- tiekd_fairseq (the plugin) <- tiekd_cli (the tools).
"""

import ast
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGES = ("tiekd", "tiekd_fairseq", "tiekd_cli")
# What each package may not import (a name or any of its submodules).
FORBIDDEN = {
    "tiekd": {"fairseq", "fairseq_cli", "tiekd_fairseq", "tiekd_cli", "numpy"},
    "tiekd_fairseq": {"tiekd_cli", "argparse", "tqdm", "subprocess", "sacrebleu", "matplotlib"},
    "tiekd_cli": set(),
}
# The one argparse name the plugin needs: fairseq pickles its checkpoints' args as a Namespace.
ALLOWED_FROM = {("argparse", "Namespace")}
COMPAT = REPO / "tiekd_fairseq" / "compat"


def modules(package):
    return sorted((REPO / package).rglob("*.py"))


def imports(tree, path):
    """(module, name or None) of every import in ``tree``, relative imports resolved."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield from ((module, alias.name) for alias in node.names)


def violations(package):
    found = []
    for path in modules(package):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        for module, name in imports(tree, path):
            top = module.split(".")[0]
            if top in FORBIDDEN[package] and (module, name) not in ALLOWED_FROM:
                found.append(f"{where} imports {module}{'.' + name if name else ''}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "__file__":
                found.append(f"{where}:{node.lineno} reads __file__ (files relative to the source tree)")
            if package == "tiekd_fairseq" and isinstance(node, ast.Call) and getattr(node.func, "id", "") == "print":
                found.append(f"{where}:{node.lineno} prints")
            if package == "tiekd_fairseq" and isinstance(node, ast.Attribute) and node.attr == "argv":
                found.append(f"{where}:{node.lineno} reads argv")
        if package != "tiekd_cli" and not path.is_relative_to(COMPAT):
            found += [f"{where}:{line}: {what}" for line, what in module_level_effects(tree)]
    return found


def module_level_effects(tree):
    """Module-level statements that change something outside the module: calls, and assignments to attributes."""
    for node in tree.body:
        if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
            yield node.lineno, "a call at import time"
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(not isinstance(t, (ast.Name, ast.Tuple)) for t in targets):
                yield node.lineno, "assigns to an attribute or item at import time"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_down_only_and_nothing_reads_the_source_tree(package):
    assert violations(package) == []


def test_the_wall_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    # The check itself, on a planted module: it must name the file and the import.
    fake = tmp_path / "tiekd"
    fake.mkdir()
    (fake / "bad.py").write_text("from fairseq import utils\nimport torch\ntorch.x = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("tiekd") == ["tiekd/bad.py imports fairseq.utils",
                                   "tiekd/bad.py:3: assigns to an attribute or item at import time"]


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


def test_the_method_package_passes_its_tests_with_fairseq_and_the_plugin_unimportable():
    code = ("import sys; sys.modules.update(fairseq=None, fairseq_cli=None, tiekd_fairseq=None, tiekd_cli=None)\n"
            "import pytest; raise SystemExit(pytest.main(['-q', '-p', 'no:cacheprovider', '--noconftest', "
            "'tests/tiekd']))")
    proc = _python(code)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_importing_the_method_patches_nothing_and_the_plugin_patches_only_through_compat():
    # Every fairseq attribute replaced and every safe-global added while the packages import is traced to
    # the module that did it.
    code = """
import sys, torch.serialization as s
import fairseq.distributed.utils, fairseq.models.distributed_fairseq_model, fairseq.checkpoint_utils
callers, real = [], s.add_safe_globals
def recording(*args, **kwargs):
    callers.append(sys._getframe(1).f_globals["__name__"])
    return real(*args, **kwargs)
s.add_safe_globals = recording
# Deduplicated: fairseq also lists some modules under an old name.
watched = list({id(m): m for n, m in list(sys.modules.items()) if n.split(".")[0] == "fairseq" and m}.values())
before = {m.__name__: dict(vars(m)) for m in watched}
def replaced():
    return sorted(f"{m.__name__}.{k} by {getattr(v, '__module__', '?')}" for m in watched
                  for k, v in vars(m).items() if k in before[m.__name__] and before[m.__name__][k] is not v)
import tiekd
assert "fairseq_cli" not in sys.modules and "tiekd_fairseq" not in sys.modules
print("tiekd:", callers, replaced())
import tiekd_fairseq
print("plugin:", sorted(set(callers)), replaced())
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "tiekd: [] []"
    assert lines[1] == ("plugin: ['tiekd_fairseq.compat.torch_safe_globals'] ["
                        "'fairseq.distributed.utils.call_main by "
                        "tiekd_fairseq.compat.fairseq_call_main', "
                        "'fairseq.models.distributed_fairseq_model.DistributedDataParallel by "
                        "tiekd_fairseq.compat.fairseq_ddp_wrapper']")
