"""Train the proxy Kontext model on procedural edits (23 to 59 minutes on 2 CPU cores, by the machine;
on CUDA when present, FLUX_DEVICE=cpu to refuse it) and write it in the real weights layout:

  python scripts/train_proxy.py --out flux/proxy_weights
  python scripts/train_proxy.py --out /tmp/proxy --quick      # seconds: a smoke run
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.errors import InputError, SetupError  # noqa: E402
from flux.lab.train import QUICK, TrainConfig, train_proxy  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("flux/proxy_weights"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="transformer steps (default: the full run's)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (tests)")
    parser.add_argument("--eager", action="store_true", help="do not torch.compile the transformer's training step")
    args = parser.parse_args()
    config = replace(QUICK if args.quick else TrainConfig(), seed=args.seed)
    if args.eager:
        config = replace(config, compile=False)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    try:
        train_proxy(args.out, config)
    except (InputError, SetupError) as error:
        sys.exit(f"error: {error}")
