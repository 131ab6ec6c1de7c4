#!/usr/bin/env python
"""The offline demo: prepare data, pretrain a small GPT-2 with MLE, finetune it
with MLE and with ScaleGrad, evaluate both, and report (table and plots).

    python scripts/demo.py [--config configs/demo.yaml] [--output-dir DIR] [--force]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scalegrad.demo import Demo, load_config, print_summary  # noqa: E402
from scalegrad.errors import UserError  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
    parser.add_argument("--output-dir", help="default: the config's output_dir")
    parser.add_argument("--force", action="store_true", help="redo stages whose outputs already exist")
    args = parser.parse_args(argv)
    try:
        demo = Demo(load_config(args.config), args.output_dir, force=args.force)
        summary = demo.run()
        print_summary(demo.out / "report", summary)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
