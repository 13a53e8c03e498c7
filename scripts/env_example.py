"""Write .env.example from `Settings`: every setting, its description and its default.

    python scripts/env_example.py        (tests/unit/deploy checks the file is up to date)
"""

from __future__ import annotations

import sys
from pathlib import Path

from uniadapter_serve.service.settings import Settings

HEADER = """# Every setting of the service, with its default. Copy to .env for docker compose.
# Unset values mean: not configured (see the description).
"""


def render() -> str:
    blocks = [HEADER]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else str(field.default)
        blocks.append(f"# {field.description}\n# UNIADAPTER_{name.upper()}={default}\n")
    return "\n".join(blocks)


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / ".env.example"
    target.write_text(render())
    sys.stdout.write(f"wrote {target}\n")
