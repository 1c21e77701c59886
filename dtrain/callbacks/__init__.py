"""The loop's duties as callbacks (the logging window, checkpoint cadence, stop signals, the non-finite
check), and the stack a run calls. May import `checkpoint`, `loggers`, `loop` and everything below."""
