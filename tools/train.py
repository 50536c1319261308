#!/usr/bin/env python
"""Train a sparse (or dense) network: `python tools/train.py --help` (same as `cigl-train`)."""

from cigl.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
