"""`python -m dtrain [--config FILE.yaml] [key=value ...]`, alone or under any launcher."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from dtrain.cli import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli("dtrain", argv, "dtrain.run:train")


if __name__ == "__main__":
    sys.exit(main())
