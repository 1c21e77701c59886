"""The typed, validated config: its schema, the YAML files it reads and writes, the overrides on top.

Imports nothing of dtrain but `errors` (and no torch), so a bad key fails before anything heavy loads.
"""

from dtrain.config.schema import *  # noqa: F401,F403  (the package's face: `from dtrain.config import Config`)
