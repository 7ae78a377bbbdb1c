"""The mutation check: each listed change to the product (flux/lab/mutations.py) is made in a copy
of the tree, and the tests paired with it must fail there. Exit status 1 when a mutation survives.

python scripts/mutation_check.py                  # every mutation (about 2 minutes on 2 cores)
python scripts/mutation_check.py --only exif      # the mutations whose name contains the text
python scripts/mutation_check.py --list           # the list, checked against the tree, nothing run
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab import mutations  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations (each checked to apply)")
    args = parser.parse_args()
    mutations.check_list()
    chosen = [m for m in mutations.MUTATIONS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file}; {', '.join(m.tests)}")
        sys.exit(0)
    outcomes = []
    for mutation in chosen:
        outcome = mutations.run(mutation)
        print(f"{'caught  ' if outcome.caught else 'SURVIVED'} {outcome.seconds:5.0f}s  {mutation.name}", flush=True)
        outcomes.append(outcome)
    print()
    print(mutations.markdown(outcomes))
    sys.exit(0 if all(o.caught for o in outcomes) else 1)
