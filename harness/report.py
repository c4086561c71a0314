"""`python -m harness.report RESULTS_DIR [options]`: see harness.cli.report_parser for the options."""
import sys

from harness.cli import report_main

if __name__ == "__main__":
    sys.exit(report_main())
