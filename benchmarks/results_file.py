"""Writing one benchmark result: the record, when and how it was made, as JSON."""

from __future__ import annotations

import datetime
import json
import os
import sys


def write(record: dict, output_dir: str, name: str, script: str, argv,
          quiet: bool = False) -> str:
    """Adds date and command to `record`, writes `<output_dir>/<name>.json`, prints it
    (unless `quiet`)."""
    record = {**record,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "command": f"python benchmarks/{script} " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    if not quiet:
        print(json.dumps(record, indent=2))
    return path
