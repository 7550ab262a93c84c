"""The one evaluation core (`core`), `deltafleet eval` over every tenant (`tasks_eval`), perplexity, the zoo."""

import deltafleet.quant  # noqa: F401  (registers the quantized-base format every --base may name)
