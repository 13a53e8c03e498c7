"""Headless Chromium from Debian's packages, driven by Playwright for Python (never a downloaded browser)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str:
    """UNIADAPTER_CHROMIUM, else Debian's chromium; scripts/dev.sh installs it (apt-get install chromium)."""
    given = os.environ.get("UNIADAPTER_CHROMIUM")
    for candidate in ([given] if given else []) + list(CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("no chromium: install Debian's package (apt-get install chromium; scripts/dev.sh does)")
    return found


def assert_not_blank(path: Path, min_colours: int = 8, min_std: float = 8.0) -> None:
    """A screenshot that shows something: several colours and real contrast, not one flat fill."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours >= min_colours and float(pixels.std()) >= min_std, (path, colours, float(pixels.std()))


def small_png(source: Path, target: Path, width: int = 900, colours: int = 64) -> int:
    """A copy for the docs: scaled to `width` and quantised to a palette, so it stays small. -> bytes."""
    image = Image.open(source).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    return target.stat().st_size
