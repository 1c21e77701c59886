"""The built-in models, user model factories, weight init and freezing.
May import `runtime`, `config` and `errors`."""
