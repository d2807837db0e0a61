"""A check of CloudWatch Embedded Metric Format records against the specification's rules."""

from __future__ import annotations

from typing import Any

import jsonschema

from twostage_rec.request_metrics import MAX_VALUES

UNITS = {"Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
         "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
         "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
         "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None"}
# The structure the EMF specification requires (written from its text): a root object with an
# _aws metadata object holding an integer Timestamp (ms) and MetricDirectives, each with a
# Namespace, DimensionSets of at most 9 keys and at most 100 MetricDefinitions (Name, Unit).
_NAME = {"type": "string", "minLength": 1, "maxLength": 255}
EMF_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["_aws"],
    "properties": {
        "_aws": {
            "type": "object",
            "required": ["Timestamp", "CloudWatchMetrics"],
            "properties": {
                "Timestamp": {"type": "integer", "minimum": 0},
                "CloudWatchMetrics": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["Namespace", "Dimensions", "Metrics"],
                        "properties": {
                            "Namespace": _NAME,
                            "Dimensions": {"type": "array", "minItems": 1,
                                           "items": {"type": "array", "maxItems": 9, "items": _NAME}},
                            "Metrics": {
                                "type": "array",
                                "maxItems": 100,
                                "items": {"type": "object", "required": ["Name"],
                                          "properties": {"Name": _NAME, "Unit": {"enum": sorted(UNITS)}}},
                            },
                        },
                    },
                },
            },
        }
    },
}


def assert_valid_emf(record: dict[str, Any]) -> None:
    """The schema, then the rules it cannot say: every referenced target is a root member, a
    dimension's value a string, a metric's a number or an array of at most 100 numbers."""
    jsonschema.validate(record, EMF_SCHEMA)
    assert next(iter(record)) == "_aws"  # serve's log4j config recognises a record by its start
    for directive in record["_aws"]["CloudWatchMetrics"]:
        for key in (k for dimension_set in directive["Dimensions"] for k in dimension_set):
            assert isinstance(record[key], str), key
        for definition in directive["Metrics"]:
            value = record[definition["Name"]]
            values = value if isinstance(value, list) else [value]
            assert 1 <= len(values) <= MAX_VALUES, definition["Name"]
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), definition["Name"]
