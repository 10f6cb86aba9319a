"""Which errors the `roadkit` command prints as one-line user errors (issue 22): the `RoadkitError`s roadkit raises
on purpose and the operating system's refusals. Any other exception is a bug, and says so in one line; --debug or
ROADKIT_DEBUG=1 adds its traceback."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_cli import cli, one_line_error

import roadkit.app.report
from roadkit import RoadConfig, get_peft_model
from roadkit.app.demo import BASE_DIR
from roadkit.errors import InputError, MissingFileError, RoadkitError, StorageError

BUG_HINT = "Rerun with --debug (or ROADKIT_DEBUG=1) for the traceback."


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """An adapter of a tiny Llama (hidden size 64 on q_proj: it does not fit the demo base's 128)."""
    path = tmp_path_factory.mktemp("errors") / "a"
    get_peft_model(tiny_llama(hidden=64), RoadConfig(target_modules=["q_proj"])).save_pretrained(path)
    return path


def failing(monkeypatch, error):
    """Make `roadkit inspect`'s work raise `error`."""

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(roadkit.app.report, "inspect_adapter", fail)


@pytest.mark.parametrize("error", [KeyError("layers"), ValueError("operands could not be broadcast"), TypeError("x")])
def test_an_unexpected_exception_is_reported_as_a_bug(adapter_dir, tmp_path, capsys, monkeypatch, error):
    failing(monkeypatch, error)
    code, _, err = cli(["inspect", adapter_dir], capsys, tmp_path, monkeypatch)
    one_line_error(code, err, "roadkit inspect: unexpected error, probably a bug in roadkit: ", BUG_HINT)
    assert f"{type(error).__name__}: " in err and ": error: " not in err


def test_debug_shows_the_traceback(adapter_dir, tmp_path, capsys, monkeypatch):
    failing(monkeypatch, KeyError("layers"))
    code, _, err = cli(["inspect", adapter_dir, "--debug"], capsys, tmp_path, monkeypatch)
    assert code == 1 and err.startswith("Traceback (most recent call last):") and "in fail" in err, err
    assert (
        err.strip().splitlines()[-1]
        == "roadkit inspect: unexpected error, probably a bug in roadkit: KeyError: 'layers'."
    )

    monkeypatch.setenv("ROADKIT_DEBUG", "1")
    code, _, err = cli(["inspect", adapter_dir], capsys, tmp_path, monkeypatch)
    assert code == 1 and "Traceback" in err and "KeyError: 'layers'" in err

    failing(monkeypatch, InputError("the adapter is odd."))  # a user error, with its traceback when debugging
    code, _, err = cli(["inspect", adapter_dir], capsys, tmp_path, monkeypatch)
    assert (
        code == 1
        and "Traceback" in err
        and err.strip().splitlines()[-1] == "roadkit inspect: error: the adapter is odd."
    )


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (PermissionError(13, "Permission denied", "/runs/a"), "[Errno 13] Permission denied: '/runs/a'"),
        (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "out of memory (CUDA out of memory.",
        ),
        (StorageError("cannot write the merged model: disk full"), "cannot write the merged model: disk full"),
    ],
)
def test_the_systems_refusals_are_user_errors(adapter_dir, tmp_path, capsys, monkeypatch, error, line):
    failing(monkeypatch, error)
    code, _, err = cli(["inspect", adapter_dir], capsys, tmp_path, monkeypatch)
    one_line_error(code, err, f"roadkit inspect: error: {line}")


def test_an_adapter_that_does_not_fit_the_model_is_a_user_error(adapter_dir, tmp_path, capsys, monkeypatch):
    """RoadModel's own checks raise plain ValueErrors; the command reports those it makes on its inputs as one line."""
    args = [
        "generate",
        "--model",
        BASE_DIR,
        "--adapter",
        f"a={adapter_dir}",
        "--prompt",
        "kitten ->",
        "--device",
        "cpu",
    ]
    code, _, err = cli(args, capsys, tmp_path, monkeypatch)
    one_line_error(code, err, "roadkit generate: error: adapter at ", "does not fit this model")


def test_roadkits_errors_keep_their_builtin_classes(tmp_path):
    from roadkit import MissingExtraError
    from roadkit.app.cli import CommandError
    from roadkit.app.data import DataError, read_jsonl
    from roadkit.app.loading import LoadError, load_causal_lm
    from roadkit.app.outputs import OutputExistsError, check_output
    from roadkit.checkpoint import read_adapter

    assert roadkit.RoadkitError is RoadkitError
    assert issubclass(MissingExtraError, ImportError) and issubclass(CommandError, RoadkitError)
    for error, builtin in ((DataError, ValueError), (LoadError, OSError), (OutputExistsError, FileExistsError)):
        assert issubclass(error, RoadkitError) and issubclass(error, builtin)
    with pytest.raises(InputError):  # and so a ValueError, as before
        RoadConfig(variant="road_3")
    with pytest.raises(MissingFileError):  # a FileNotFoundError
        read_adapter(tmp_path)
    with pytest.raises(DataError):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(LoadError):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(OutputExistsError):
        check_output(tmp_path, overwrite=False)
    with pytest.raises(InputError, match="not divisible by group_size=48"):
        get_peft_model(tiny_llama(hidden=64), RoadConfig(target_modules=["q_proj"], group_size=48))
