"""The training loop (fit), one optimizer step, exact eval, the state a run changes, the loss contract, and the
callback seam (hooks: what the loop calls, the requests it agrees on).
May import `parallel`, `models`, `data`, `runtime`, `config` and `errors`."""
