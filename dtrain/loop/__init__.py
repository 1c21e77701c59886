"""The training loop: one optimizer step, exact eval, the state a run changes, the loss contract.
May import `parallel`, `models`, `data`, `runtime`, `config` and `errors`."""
