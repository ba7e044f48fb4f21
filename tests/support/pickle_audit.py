"""`python -m tests.support.pickle_audit ARGS`: `mlflow-dspy ARGS` in a process that records every unpickled
global.

Python raises the audit event `pickle.find_class` (module, name) whenever an unpickler (the C one and the
Python one) looks up a class or function by name: every pickle that holds more than plain data does. The hook,
installed before anything else is imported, appends `module.name` to the file `PICKLE_AUDIT_LOG` names, one
line per event, written at once; the test reads the file while the process still runs.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    record = open(os.environ["PICKLE_AUDIT_LOG"], "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def hook(event: str, args: tuple) -> None:
        if event == "pickle.find_class":
            record.write(f"{args[0]}.{args[1]}\n")

    sys.addaudithook(hook)
    from mlflow_dspy.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
