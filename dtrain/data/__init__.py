"""Where the samples come from: datasets (built-in, vision, factories), samplers, and the sources
that hand the loop windows of batches. May import `runtime`, `config` and `errors`."""

from dtrain.data.types import Datasets, as_datasets  # noqa: F401  (the public names)
