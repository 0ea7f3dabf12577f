"""`make bench`: runs every benchmark suite present and prints the tables."""

import sys

print("vipd bench: no benchmark suites in this build yet", file=sys.stderr)
