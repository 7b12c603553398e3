"""`ask`, the command-line entry point: above app/, ui/ and bench/, it dispatches to each."""
