"""What one process runs on: the launch environment, the process group and its agreements, signals,
faults, seeding and user code loading. May import `config` and `errors`; nothing above it."""
