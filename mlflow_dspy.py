"""The front door in a checkout: `python mlflow_dspy.py ...` is the `mlflow-dspy` command.

The package `mlflow_dspy/` beside this file holds everything; Python imports
the package (not this file) for `import mlflow_dspy`, because a package
directory wins over a module of the same name on the same path entry.
"""

import sys

from mlflow_dspy.cli import main

if __name__ == "__main__":
    sys.exit(main())
