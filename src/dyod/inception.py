"""Standard Inception features for KID on photographs: the TF-ported InceptionV3 ("2015-12-05") of pytorch-fid,
torchmetrics and torch-fidelity, 2048-d pool features.

Why a copy of the network here rather than torch-fidelity's (which torchmetrics' FID and KID use) or pytorch-fid's:
both import torchvision (torch-fidelity in its package's ``__init__``, pytorch-fid to build the blocks), and no
torchvision build imports beside the CPU torch dyod pins; torch-fidelity also reads its weights with
a torch.load that allows pickled objects, which can run code. The copy is checked against torch-fidelity's forward pass
on the same weights (tests/test_evaluation.py): the weights file's key layout is the same, and so are the features.

dyod cannot download weights. Point ``--inception-weights`` at the file those tools use
(``pt_inception-2015-12-05-6726825d.pth``, in ``~/.cache/torch/hub/checkpoints/`` once they have run) or at a
``.safetensors`` conversion of it. A ``.pth`` is read with ``torch.load(weights_only=True)``, which loads tensors
only and refuses pickled code. Images are resized to 299 × 299 with PyTorch's bilinear filter and scaled to [-1, 1]
as pytorch-fid does (torch-fidelity resamples as TF 1.x did and scales by (x − 128) / 128: its numbers differ
slightly)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .errors import DyodError, first_line

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):  # the TF graph averages over valid pixels only
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the TF graph max-pools (pytorch-fid's FIDInceptionE_2)
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1),
            self.branch_pool(pool),
        ], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 with the FID weights' layer names; ``forward`` returns the 2048-d pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # present in the weights file; unused for features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] at 299 × 299 -> [B, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_inception_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DyodError(
            f"Inception weights {path} not found. dyod cannot download them: copy {WEIGHTS_NAME} (torch-fidelity / "
            "torchmetrics / pytorch-fid keep it in ~/.cache/torch/hub/checkpoints/) to this machine and pass "
            "--inception-weights PATH, or use --features emoji"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never pickled code
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e):  # a pickle that holds more than tensors: what it would run is not run
            raise DyodError(f"{path} holds pickled objects besides tensors, which dyod does not load (a pickle can "
                            f"run code); give the FID Inception weights file {WEIGHTS_NAME}") from None
        raise DyodError(_unreadable_weights(path, e)) from None
    except Exception as e:  # noqa: BLE001 - a truncated download, a file of another kind
        raise DyodError(_unreadable_weights(path, e)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DyodError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; give the FID Inception "
                        f"weights file {WEIGHTS_NAME}")
    return state


def _unreadable_weights(path: Path, error: Exception) -> str:
    detail = first_line(error)
    return (f"{path} cannot be read as a weights file ({type(error).__name__}{': ' + detail[:200] if detail else ''}); "
            f"it may be truncated or of another kind: give the FID Inception weights file {WEIGHTS_NAME}")


class InceptionFeatures:
    """KID features from the standard FID InceptionV3 (2048-d), given a local weights file."""

    name = "inception"

    def __init__(self, weights: str | os.PathLike | dict, device: str | torch.device = "cpu"):
        state = weights if isinstance(weights, dict) else load_inception_state(weights)
        model = FIDInceptionV3()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise DyodError(f"the Inception weights lack {len(missing)} tensors (e.g. {missing[0]}); "
                            f"expected the FID InceptionV3 file {WEIGHTS_NAME}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 64) -> torch.Tensor:
        """PIL images (of any sizes) or a [B, 3, H, W] tensor in [-1, 1] -> [B, 2048] features."""
        from .data import pil_to_resized_tensor

        def resize(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)

        out = []
        for i in range(0, len(images), batch_size):  # resized a batch at a time: 1 MiB an image at 299 px
            batch = images[i:i + batch_size]
            x = resize(batch) if isinstance(batch, torch.Tensor) else pil_to_resized_tensor(batch, resize)
            out.append(self.model(x.to(self.device)).cpu())
        return torch.cat(out).double()
