import sys

from flux.cli import main

sys.exit(main())
