"""`python -m harness.run GRID [options]`: see harness.cli.run_parser for the options."""
import sys

from harness.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
