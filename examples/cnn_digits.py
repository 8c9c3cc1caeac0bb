"""A small CNN on sklearn's digits as 1x8x8 images: a model factory of your own.

    ensemble run configs/cnn-digits.yaml

The config names this function as `model.factory: examples/cnn_digits.py:cnn`. The job
calls it as cnn(features, classes, **model.options) for each member, with torch's generator
seeded per member, and tethers every nn.Conv2d and nn.Linear in it (W ⊙ T). Any module
works the same way, if it has no buffers (no batch norm: stacked training has no running
statistics) and maps a (B, features) batch to (B, classes) logits.

After the job, `ensemble export RUN --out DIR` writes each member's state_dict with its
tethers folded in, under this module's own keys:

    net = cnn(64, 10, channels=8)
    net.load_state_dict(safetensors.torch.load_file("DIR/model_0.safetensors"))

with no import of the ensemble package (see main() below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, classes: int, channels: int = 8, side: int = 8):
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.out = nn.Linear(2 * channels * (side // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, self.side, self.side)  # rows of 64 pixels -> 1x8x8 images
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2c, 4, 4)
        return self.out(x.flatten(1))


def cnn(features: int, classes: int, channels: int = 8) -> nn.Module:
    side = round(features**0.5)
    if side * side != features:
        raise ValueError(f"expected square images, got {features} features")
    return DigitsCNN(classes, channels, side)


def main() -> None:
    """Exported members in plain PyTorch, on all of sklearn's digits (the job's training
    rows included, so this is not a test score: `ensemble eval RUN` gives that):
    python examples/cnn_digits.py EXPORT_DIR"""
    import json
    import sys
    from pathlib import Path

    import numpy as np
    from safetensors.torch import load_file
    from sklearn.datasets import load_digits

    export = Path(sys.argv[1])
    manifest = json.loads((export / "manifest.json").read_text())
    pre = load_file(str(export / "preprocess.safetensors"))  # the job's standardisation
    digits = load_digits()
    x = torch.from_numpy(digits.data).float()
    x = (x - pre["mean"]) / pre["std"] if pre else x
    probs = []
    for f in manifest["files"]:
        net = cnn(x.shape[1], len(digits.target_names), **manifest["options"])
        net.load_state_dict(load_file(str(export / f)))
        with torch.no_grad():
            probs.append(torch.softmax(net.eval()(x), 1).numpy())
    acc = (np.mean(probs, 0).argmax(1) == digits.target).mean()
    print(f"{len(probs)} members; ensemble accuracy on all {len(x)} digits: {acc:.4f}")


if __name__ == "__main__":
    main()
