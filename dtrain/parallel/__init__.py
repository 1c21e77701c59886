"""How the model is spread over the ranks (the strategy): wrapping, gradient sync, clipping, unwrapping.
May import `runtime`, `config` and `errors`."""
