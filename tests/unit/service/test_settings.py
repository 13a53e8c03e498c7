"""Loading the configuration is light: no PyAV (FFmpeg), no torch."""

from __future__ import annotations

import json
import subprocess
import sys

from uniadapter_serve.model.media import video
from uniadapter_serve.service import settings

HEAVY = ("av", "torch", "transformers", "faiss")


def test_importing_settings_loads_no_heavy_package():
    code = ("import json, sys; import uniadapter_serve.service.settings as s; "
            "s.Settings(_env_prefix='UNIADAPTER_SETTINGS_TEST_IGNORED_'); "
            f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_control_loads_them():
    """The check above can fail: importing the video decoder does load PyAV and torch."""
    code = ("import json, sys; import uniadapter_serve.model.media.video; "
            f"print(json.dumps(sorted(m for m in {list(HEAVY[:2])!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["av", "torch"]


def test_frames_held_matches_the_decoder():
    assert settings.FRAMES_HELD == video.FRAMES_HELD
