"""Image-folder CT sets (PNG/JPEG, one subfolder per class, as torchvision's ImageFolder lays out).

Public CT classification sets often ship slices as already-windowed 8- or 16-bit images rather
than DICOM. They are not HU, so they bypass the cache and windows: images are scaled to [0, 1]
(8-bit by 255, 16-bit by 65535), resized to `size` and given `channels` channels.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageFolderSlices(torch.utils.data.Dataset):
    """``root/<class>/**/<image>`` -> ((channels, size, size) float in [0, 1], class index).

    group: a regular expression whose first group (or whole match) in the file's path relative to
    root names the patient, for :func:`~sparkct.data.patient_split` (default: the file's folder
    with its class folder, so slices kept in per-patient folders stay together; a file directly in
    its class folder is its own group). transform: applied
    to the (1, C, H, W) batch of one image after resizing (e.g. an augmentation working in [0, 1])."""

    def __init__(
        self,
        root: str,
        size: int | None = 224,
        *,
        channels: int = 3,
        classes: Sequence[str] | None = None,
        group: str | None = None,
        transform: Callable | None = None,
    ):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root!r} is not a folder")
        if channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        missing = [c for c in self.classes if c not in found]
        if missing:
            raise ValueError(f"class folders not found under {root!r}: {missing}")
        if not self.classes:
            raise ValueError(f"no class folders under {root!r}")
        self.root, self.size, self.channels, self.transform = root, size, channels, transform
        self.samples: list[tuple[str, int]] = []
        for ci, c in enumerate(self.classes):
            for dirpath, dirs, files in os.walk(os.path.join(root, c)):
                dirs.sort()
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."):
                        self.samples.append((os.path.join(dirpath, f), ci))
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root!r}")
        self.targets = np.array([c for _, c in self.samples], dtype=np.int64)
        rx = re.compile(group) if group else None
        keys = []
        for path, _ in self.samples:
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rx is not None:
                m = rx.search(rel)
                key = (m.group(1) if m.groups() else m.group(0)) if m else rel
            else:
                parts = rel.split("/")
                key = "/".join(parts[:-1]) if len(parts) > 2 else rel  # class/sub/folder, else the file
            keys.append(hashlib.sha1(key.encode()).hexdigest()[:16])
        names, inv = np.unique(np.array(keys), return_inverse=True)
        self.patient_names = names
        self.patients = inv.astype(np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor:
        path, _ = self.samples[i]
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / (
                    65535.0 if im.mode.startswith("I;16") else max(1.0, float(np.asarray(im).max()))
                )
            else:
                arr = np.asarray(im.convert("L" if self.channels == 1 else "RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(np.ascontiguousarray(arr))
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        if t.shape[0] != self.channels:
            t = t.mean(0, keepdim=True) if self.channels == 1 else t[:1].expand(3, -1, -1)
        if self.size is not None and tuple(t.shape[-2:]) != (self.size, self.size):
            t = torch.nn.functional.interpolate(
                t[None], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )[0]
        return t.contiguous()

    def __getitem__(self, i):
        x = self.load(int(i))
        if self.transform is not None:
            x = self.transform(x[None])[0]
        return x, int(self.targets[int(i)])
