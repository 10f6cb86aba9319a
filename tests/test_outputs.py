"""Output directories appear whole or not at all; existing ones are replaced only when asked."""

from __future__ import annotations

import os

import pytest

from roadkit.app.outputs import OutputExistsError, check_output, staged_directory


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out"
    with staged_directory(target) as stage:
        assert not target.exists()
        (tmp_path / stage / "f.txt").write_text("new")
    assert (target / "f.txt").read_text() == "new" and leftovers(tmp_path) == []


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_directory(target) as stage:
        (tmp_path / stage / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not target.exists() and leftovers(tmp_path) == []


def test_overwrite_keeps_old_until_new_is_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_directory(target):
        raise KeyboardInterrupt
    assert (target / "old.txt").read_text() == "old"
    with staged_directory(target) as stage:
        (tmp_path / stage / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"] and leftovers(tmp_path) == []


def test_check_output(tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "file").write_text("x")
    assert check_output(tmp_path / "new", overwrite=False) == str(tmp_path / "new")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_output(tmp_path / "exists", overwrite=False)
    assert check_output(tmp_path / "exists", overwrite=True)
    with pytest.raises(OutputExistsError, match="is a file"):
        check_output(tmp_path / "file", overwrite=True)
    (tmp_path / "exists" / "model").mkdir()
    with pytest.raises(ValueError, match="holds the input"):
        check_output(tmp_path / "exists", overwrite=True, inputs=[tmp_path / "exists" / "model"])


def test_keep_existing_copies_the_users_files_into_the_new_directory(tmp_path):
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "run.txt").write_text("old run")
    (target / "mine.png").write_text("mine")
    (target / "sub" / "notes.txt").write_text("notes")
    with pytest.raises(RuntimeError), staged_directory(target, keep_existing=True) as stage:
        (tmp_path / stage / "run.txt").write_text("half")
        raise RuntimeError("boom")
    assert (target / "run.txt").read_text() == "old run" and leftovers(tmp_path) == []
    with staged_directory(target, keep_existing=True) as stage:
        (tmp_path / stage / "run.txt").write_text("new run")
    assert (target / "run.txt").read_text() == "new run"
    assert (target / "mine.png").read_text() == "mine" and (target / "sub" / "notes.txt").read_text() == "notes"
    assert leftovers(tmp_path) == []


def test_a_missing_local_model_is_not_reported_as_only_a_hub_error(tmp_path, monkeypatch):
    import transformers

    from roadkit.app.loading import LoadError, load_causal_lm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError, match="no local directory 'models/tiny' exists, so it was tried as a Hugging Face"):
        load_causal_lm("models/tiny")
