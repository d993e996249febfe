"""Sums the JUnit XML reports Pants writes into one closing line: 'N passed, N failed'.

Exits non-zero when no test ran, so an empty run never looks green.
"""

import sys
import xml.etree.ElementTree as ET  # nosec B405 # our own JUnit reports, not untrusted input
from pathlib import Path

totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for report in sorted(Path(sys.argv[1]).glob("*.xml")):
    for suite in ET.parse(report).getroot().iter("testsuite"):  # nosec B314 # as above
        for key in totals:
            totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"tests: {passed} passed, {failed} failed, {totals['skipped']} skipped")
sys.exit(1 if failed or not totals["tests"] else 0)
