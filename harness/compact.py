"""`python -m harness.compact RESULTS_DIR`: see harness.cli.compact_main."""
import sys

from harness.cli import compact_main

if __name__ == "__main__":
    sys.exit(compact_main())
