"""`roadkit compose`: saved adapters in, one composed adapter directory out (PEFT layout)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

from roadkit import RoadConfig, RoadModel, get_peft_model
from roadkit.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base and three saved adapters: a and b in disjoint shards, c on all pairs of other layers too."""
    root = tmp_path_factory.mktemp("compose")
    base = tiny_llama()
    torch.manual_seed(0)
    specs = {
        "a": RoadConfig(group_size=8, init_weights=False, target_modules=QV, subspace="0/2"),
        "b": RoadConfig(variant="road_2", group_size=8, init_weights=False, target_modules=QV, subspace="1/2"),
        "c": RoadConfig(variant="road_4", group_size=8, init_weights=False, target_modules=["q_proj", "o_proj"]),
    }
    for name, config in specs.items():
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():  # positive scales, so that interpolation (of log-scales) applies
            for _, layer in model.road_layers():
                layer.road_alpha["default"].abs_().add_(0.1)
        model.save_pretrained(root / name)
    return root, base


def logits(base, dirs, ids):
    """Logits of base with the adapters in `dirs` active in that order."""
    model = RoadModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="x0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"x{i}")
    model.set_adapter([f"x{i}" for i in range(len(dirs))])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("mode", "names", "extra"),
    [
        ("union", ["a", "b"], []),
        ("sequential", ["a", "c", "b"], []),
        ("interpolate", ["c", "a"], ["--weights", "1,0"]),
    ],
)
def test_compose_writes_an_adapter_equal_to_its_definition(saved, input_ids, mode, names, extra, capsys):
    root, base = saved
    out = root / f"out-{mode}"
    code = main(
        ["compose", *[f"--adapter={n}={root / n}" for n in names], "--mode", mode, "--output", str(out), *extra]
    )
    assert code == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    expected = logits(base, [root / "c"] if mode == "interpolate" else [root / n for n in names], input_ids)
    torch.testing.assert_close(logits(base, [out], input_ids), expected, atol=1e-5, rtol=1e-5)


def test_compose_runs_as_a_command(saved):
    root, _ = saved
    out = root / "out-subprocess"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "roadkit",
            "compose",
            "--adapter",
            f"a={root / 'a'}",
            "--adapter",
            f"b={root / 'b'}",
            "--mode",
            "union",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert RoadConfig.from_pretrained(out).subspace == {
        "union": [{"shard": 0, "num_shards": 2}, {"shard": 1, "num_shards": 2}]
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "a={a}", "--adapter", "c={c}", "--mode", "union"], "overlap"),
        (["--adapter", "a={a}", "--adapter", "c={c}", "--mode", "interpolate", "--weights", "1,x"], "--weights"),
        (["--adapter", "a={a}", "--adapter", "c={c}", "--mode", "interpolate", "--weights", "1,0,1"], "one finite"),
        (["--adapter", "a={a}", "--adapter", "c={c}", "--weights", "1,0"], "only to mode='interpolate'"),
        (["--adapter", "a={a}", "--adapter", "m={root}/missing"], "does not exist"),
        (["--adapter", "a={a}", "--adapter", "a={c}"], "given twice"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(saved, args, message, capsys):
    root, _ = saved
    out = root / "bad-out"
    code = main(["compose", *[a.format(a=root / "a", c=root / "c", root=root) for a in args], "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.startswith("roadkit compose: error:") and err.count("\n") == 1
    assert not out.exists()
    assert not [p for p in os.listdir(root) if p.startswith(".bad-out")]  # no staging directory left


def test_existing_output_is_kept_unless_overwrite(saved, capsys):
    root, _ = saved
    out = root / "kept"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = [
        "compose",
        "--adapter",
        f"a={root / 'a'}",
        "--adapter",
        f"b={root / 'b'}",
        "--mode",
        "union",
        "--output",
        str(out),
    ]
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["mine.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert "adapter_config.json" in os.listdir(out) and "mine.txt" not in os.listdir(out)


def test_tampered_subspace_adapter_is_refused(saved, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, _ = saved
    bad = tmp_path / "tampered"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((root / "a" / "adapter_config.json").read_bytes())
    tensors = load_file(root / "a" / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("road_theta"))
    tensors[key][-1] = 0.5  # the last pair belongs to shard 1, outside a's shard 0
    save_file(tensors, bad / "adapter_model.safetensors")
    code = main(
        [
            "compose",
            "--adapter",
            f"t={bad}",
            "--adapter",
            f"b={root / 'b'}",
            "--mode",
            "union",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1 and "not the identity outside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_adapters_of_different_base_models_are_refused(saved, tmp_path, capsys):
    root, _ = saved
    other = tiny_llama(hidden=64)
    get_peft_model(other, RoadConfig(group_size=8, target_modules=QV)).save_pretrained(tmp_path / "other")
    code = main(
        [
            "compose",
            "--adapter",
            f"a={root / 'a'}",
            "--adapter",
            f"o={tmp_path / 'other'}",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "disagree on the size of layer" in err and "different base models" in err
    assert not (tmp_path / "out").exists()
