"""Check what `pip install roadkit` alone gives (torch and safetensors, no extras), run in such an environment
(scripts/test.sh makes one, .venv-core, where nothing else is installed): the library works end to end on a
plain torch model (train, save, load, merge), and a feature that needs an extra says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def main() -> int:
    import torch
    from torch import nn

    import roadkit

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    model = roadkit.get_peft_model(base(), roadkit.RoadConfig(target_modules=["0", "2"], group_size=4))
    x = torch.randn(3, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).pow(2).sum().backward()
    optimizer.step()
    model.eval()
    command = os.path.join(os.path.dirname(sys.executable), "roadkit")  # the console script of this environment
    with torch.no_grad(), tempfile.TemporaryDirectory() as directory:
        y = model(x)
        assert not torch.equal(y, base()(x)), "one training step left the adapter at the identity"
        model.save_pretrained(directory)
        again = roadkit.RoadModel.from_pretrained(base(), directory)
        assert torch.equal(again(x), y), "the saved adapter does not reproduce the model"
        merged = again.merge_and_unload()
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-6)
        run = subprocess.run([command, "inspect", directory], capture_output=True, text=True)
    try:
        trainer = roadkit.RoadTrainer
    except roadkit.MissingExtraError as err:
        assert str(err).endswith("pip install 'roadkit[hf]'"), err
    else:
        raise AssertionError(f"roadkit.RoadTrainer ({trainer}) was found without the hf extra")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, (run.returncode, run.stderr)
    assert lines[0].endswith("pip install 'roadkit[cli]'"), lines
    print(f"core install: ok (roadkit {roadkit.__version__}, torch {torch.__version__}); `roadkit`: {lines[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
