"""The package's shape, as docs/architecture.md draws it: imports run one way (core <- integrations <-
application) with no cycles, every table of the doc holds for the code (floors, the vLLM plugin, the rules,
the caches), and the core works with torch and safetensors alone, a missing extra being one line naming its
`pip install`."""

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
    """module -> the roadkit modules (package `__init__` files included) it imports. A module's own ancestor
    packages are no edge: Python has imported them before the module runs (`from . import checkpoint`)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {
        name: {m for m in imports_of(path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }


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


# ---- docs/architecture.md: every table, read and checked --------------------------------------------


def doc_tables() -> dict[tuple[str, ...], list[list[str]]]:
    """Every table of docs/architecture.md, by its header: its rows, as lists of cells."""
    tables: dict[tuple[str, ...], list[list[str]]] = {}
    lines = (SRC.parent / "docs" / "architecture.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            header = tuple(c.strip() for c in line.strip().strip("|").split("|"))
            rows = []
            for row in lines[i + 2 :]:  # past the header and its rule
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            tables[header] = rows
    return tables


def names_in(cell: str, package: str = "roadkit") -> list[str]:
    """The modules a cell names (`model.py`, `layers/`, `__init__.py`), as dotted names under `package`;
    what stands in parentheses describes them and is skipped."""
    out = []
    for name in re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cell)):
        parts = [package] + name.removesuffix("/").removesuffix(".py").split("/")
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def matches(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def row_of(module: str, rows: dict[str, int], where: str) -> int:
    for prefix in sorted(rows, key=len, reverse=True):
        if matches(module, [prefix]):
            return rows[prefix]
    raise AssertionError(f"{module} is in no row of {where}")


FLOORS = ("part", "floor", "modules", "what they do")
VLLM = ("module", "what it does", "imports vLLM")
RULES = ("these", "rule", "those", "why")
CACHES = ("cache", "module", "what it holds", "filled", "emptied")


def test_every_table_of_the_doc_is_checked():
    assert set(doc_tables()) == {FLOORS, VLLM, RULES, CACHES}, "a new table needs its check here"


def test_every_module_the_doc_names_exists(graph):
    tables = doc_tables()
    cells = [(row[2], "roadkit") for row in tables[FLOORS]] + [
        (row[0], "roadkit.integrations.vllm") for row in tables[VLLM]
    ]
    cells += [(row[i], "roadkit") for row in tables[RULES] for i in (0, 2)] + [
        (row[1], "roadkit") for row in tables[CACHES]
    ]
    named = {name for cell, package in cells for name in names_in(cell, package)}
    assert not sorted(n for n in named if n not in graph), "docs/architecture.md names modules that do not exist"


def test_the_floor_table_is_true(graph):
    """Every module, package `__init__` files included, has a row, and imports run down the table."""
    rows = {name: i for i, row in enumerate(doc_tables()[FLOORS]) for name in names_in(row[2])}
    where = "docs/architecture.md's floor table"
    for module in graph:
        row_of(module, rows, where)
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if (a, b) not in FRONT_DOOR and row_of(b, rows, where) < row_of(a, rows, where)
    )
    assert not upward, upward


def vllm_imports(path: Path, in_functions: bool) -> bool:
    """Whether a file imports vllm by an import statement (anywhere, or outside functions only)."""
    for node in _nodes(ast.parse(path.read_text()), in_functions):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n == "vllm" or n.startswith("vllm.") for n in names):
            return True
    return False


def test_the_vllm_table_is_true(graph):
    """Every module of the plugin has a row, imports inside it run down the table, and the last column says
    when each imports vLLM."""
    package = "roadkit.integrations.vllm"
    table = doc_tables()[VLLM]
    rows = {name: i for i, row in enumerate(table) for name in names_in(row[0], package)}
    where = "docs/architecture.md's vLLM table"
    mine = {m for m in graph if matches(m, [package])}
    upward = sorted(
        f"{a} -> {b}"
        for a in mine
        for b in graph[a] & mine
        if b != package and row_of(b, rows, where) < row_of(a, rows, where)
    )
    assert not upward, upward
    for row in table:
        for module in names_in(row[0], package):
            path = SRC / module.replace(".", "/")
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            anywhere, at_import = vllm_imports(path, True), vllm_imports(path, False)
            assert {"yes": at_import, "no": not anywhere, "at registration": not at_import}[row[2]], (module, row[2])


RULE_CHECKS = {
    "never import": lambda importer, these, imported, those: (
        not (matches(importer, these) and matches(imported, those))
    ),
    "is imported only by": lambda importer, these, imported, those: (
        not matches(imported, these) or matches(importer, these + those)
    ),
    "imports from the core only": lambda importer, these, imported, those: (
        not matches(importer, these) or part(imported) != "core" or matches(imported, those)
    ),
}


def test_the_rules_table_is_true(graph):
    """Each rule ("`layers/` never import `checkpoint.py`") holds for every import."""
    for these_cell, rule, those_cell, _ in doc_tables()[RULES]:
        check = RULE_CHECKS[rule.removesuffix("s") if rule.startswith("never") else rule]
        these, those = names_in(these_cell), names_in(those_cell)
        broken = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if not check(a, these, b, those))
        assert not broken, f"{these_cell} {rule} {those_cell}: {broken}"


CACHE_DECORATORS = re.compile(r"@(?:functools\.)?(?:cache|lru_cache)\b[^\n]*\n(?:@[^\n]*\n)*def (\w+)")
INSTANCE_MEMOS = re.compile(r"__dict__\[\"(\w+)\"\]\s*=")


def test_the_caches_table_names_every_cache_of_the_core(graph):
    """Each cache the table names exists in the modules it gives, and every process-wide cache
    (`functools.cache`) and instance-dict memo of the core has a row."""
    table = doc_tables()[CACHES]
    listed = " ".join(row[0] for row in table)
    for cache_cell, module_cell, *_ in table:
        sources = " ".join(
            (SRC / m.replace(".", "/")).with_suffix(".py").read_text()
            if (SRC / m.replace(".", "/")).with_suffix(".py").is_file()
            else (SRC / m.replace(".", "/") / "__init__.py").read_text()
            for m in names_in(module_cell)
        )
        for name in re.findall(r"`([^`]+)`", cache_cell):
            assert re.search(rf"\b{name.split('.')[-1]}\b", sources), f"{name} is not in {module_cell}"
    for module in graph:
        if part(module) != "core":
            continue
        path = SRC / module.replace(".", "/")
        text = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
        owner = module.rpartition(".")[2]  # a process-wide cache is named with its module: `c_ops._load`
        wanted = [f"`{owner}.{n}`" for n in CACHE_DECORATORS.findall(text)] + [
            f".{n}`"
            for n in INSTANCE_MEMOS.findall(text)  # an instance memo with its class: `RoadModel._memo`
        ]
        missing = [w for w in wanted if w not in listed]
        assert not missing, f"{module} keeps state the caches table does not list: {missing}"


def test_no_import_cycles(graph):
    edges = {a: {b for b in t if (a, b) not in FRONT_DOOR} for a, t in graph.items()}
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
