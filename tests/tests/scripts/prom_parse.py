"""Reads a Prometheus text exposition on stdin and prints it as JSON, parsed
by the reference parser of prometheus_client: a list of families
{"name", "type", "help", "samples": [{"name", "labels", "value"}]}.
A parse error exits 1 with the error on stderr.

prometheus_client names a counter family without its `_total` suffix; its
samples keep it.
"""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def number(v):
    # JSON has no NaN or infinities.
    return v if math.isfinite(v) else str(v)


def main():
    text = sys.stdin.read()
    try:
        families = [
            {
                "name": f.name,
                "type": f.type,
                "help": f.documentation,
                "samples": [
                    {"name": s.name, "labels": s.labels, "value": number(s.value)}
                    for s in f.samples
                ],
            }
            for f in text_string_to_metric_families(text)
        ]
    except Exception as e:  # the parser raises ValueError and friends
        print(f"unparseable exposition: {e!r}", file=sys.stderr)
        sys.exit(1)
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
