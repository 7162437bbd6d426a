#!/usr/bin/env python3
"""Reads OpenMetrics text on stdin and parses it with prometheus_client's strict parser.

Prints one family name per line and exits 0, or prints the parser's error and exits 1. This is
the parser client_rust's own tests use; promtool's `check metrics` only knows the classic text
format.
"""
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as err:  # the parser raises ValueError and friends
        print(f"invalid OpenMetrics: {err}", file=sys.stderr)
        return 1
    for family in families:
        print(family.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
