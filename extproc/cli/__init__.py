"""The `checkstream` command line (CLI process)."""
