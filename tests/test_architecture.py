"""The package's shape: imports run one way (core <- integrations <- application) with no cycles, and the core
works with torch and safetensors alone, a missing extra being one line naming its `pip install`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
# The package's front door may name the rest, inside functions only: `roadkit.RoadTrainer` is imported
# on first use, and `python -m roadkit` runs the command line.
FRONT_DOOR = {("roadkit", "roadkit.integrations.trainer"), ("roadkit.__main__", "roadkit.app.cli")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nodes(tree: ast.AST, in_functions: bool):
    """Every node of `tree`, or only those outside function bodies."""
    for node in ast.iter_child_nodes(tree):
        if in_functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield node
            yield from _nodes(node, in_functions)


def imports_of(path: Path, in_functions: bool = True) -> set[str]:
    """The roadkit modules a file imports: by import statements (at module level, and inside functions unless
    `in_functions` is False), or by name in a string (`importlib.import_module("roadkit.app.cli")`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _nodes(ast.parse(path.read_text()), in_functions):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("roadkit."):
            found.add(node.value.split(":")[0])
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "roadkit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "roadkit":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import functional`
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_front_door_imports_the_rest_only_when_asked():
    for name, target in FRONT_DOOR:
        path = SRC / "roadkit" / ("__init__.py" if name == "roadkit" else "__main__.py")
        assert target in imports_of(path)
        if name == "roadkit":  # `import roadkit` itself stays in the core
            assert not {m for m in imports_of(path, in_functions=False) if part(m) != "core"}


def part(module: str) -> str:
    if module.startswith("roadkit.app"):
        return "app"
    if module.startswith("roadkit.integrations"):
        return "integrations"
    return "core"


def test_imports_run_one_way(graph):
    rank = {"core": 0, "integrations": 1, "app": 2}
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if rank[part(b)] > rank[part(a)] and (a, b) not in FRONT_DOOR
    )
    assert not upward, upward
    assert not [b for b in graph["roadkit.integrations.trainer"] if part(b) == "app"]
    assert len(graph) > 40  # the walk found the package


def floors() -> dict[str, int]:
    """docs/architecture.md's module table: module (or package prefix) -> row, 0 at the top."""
    rows: dict[str, int] = {}
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    table = text[text.index("| part |") :].split("\n\n")[0].splitlines()  # the first table, to its end
    for row, line in enumerate(table[2:]):  # past the header and its rule
        cell = re.sub(r"\([^)]*\)", "", line.split("|")[3])  # the modules column, without (contents)
        for name in re.findall(r"`([^`]+)`", cell):
            rows["roadkit." + name.removesuffix(".py").removesuffix("/").replace("/", ".")] = row
    return rows


def floor_of(module: str, rows: dict[str, int]) -> int:
    for prefix in sorted(rows, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return rows[prefix]
    raise AssertionError(f"{module} is in no row of docs/architecture.md's table")


def test_the_architecture_table_is_true(graph):
    rows = floors()
    packages = {m for m in graph if (SRC / m.replace(".", "/") / "__init__.py").is_file()}
    for module in sorted(set(graph) - packages - {"roadkit"}):
        floor_of(module, rows)  # every module has its row
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a not in packages
        for b in targets
        if b not in packages and (a, b) not in FRONT_DOOR and floor_of(b, rows) < floor_of(a, rows)
    )
    assert not upward, upward


def test_no_import_cycles(graph):
    edges = {a: {b for b in t if (a, b) not in FRONT_DOOR and not a.startswith(b + ".")} for a, t in graph.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges[node]):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for node in sorted(edges):
        if node not in seen:
            visit(node, [node])


BLOCK_EXTRAS = """
import sys
for name in ("transformers", "accelerate", "huggingface_hub", "tqdm", "matplotlib", "tokenizers", "gguf", "peft"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import torch, safetensors.torch
BEFORE = {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
"""


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS + code], capture_output=True, text=True, timeout=120)


def test_the_core_needs_torch_and_safetensors_only(tmp_path):
    out = run_without_extras(f"""
import torch
from torch import nn
import roadkit

def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

model = roadkit.get_peft_model(base(), roadkit.RoadConfig(target_modules=["0", "2"], group_size=4, init_weights=False))
x = torch.randn(3, 8)
with torch.no_grad():
    y = model(x)
model.save_pretrained({str(tmp_path)!r})
again = roadkit.RoadModel.from_pretrained(base(), {str(tmp_path)!r})
with torch.no_grad():
    assert torch.equal(again(x), y)
after = set(m.split(".")[0] for m, v in sys.modules.items() if v is not None)
print(sorted(m for m in after - BEFORE if m not in sys.stdlib_module_names and m != "roadkit"))
""")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_a_missing_extra_is_one_line_naming_its_install():
    out = run_without_extras("""
import roadkit
try:
    roadkit.RoadTrainer
except roadkit.MissingExtraError as err:
    print(err)
""")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        out.stdout.strip()
        == "roadkit.RoadTrainer needs transformers, accelerate, huggingface_hub: pip install 'roadkit[hf]'"
    )


def test_the_command_without_its_extra_says_what_to_install(tmp_path):
    out = run_without_extras(f"""
from roadkit.app.cli import main
sys.exit(main(["compose", "--adapter", "a={tmp_path}", "--output", "{tmp_path / "out"}"]))
""")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roadkit compose: error: roadkit compose needs transformers"), lines
    assert lines[0].endswith("pip install 'roadkit[cli]'")
    assert not (tmp_path / "out").exists()
