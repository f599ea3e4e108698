"""The bottom floor: errors, paths (local and gs://), quiet start-up, gin utilities,
the binaries' argument precheck and config value checks. Nothing here imports the
rest of the package at module level (see docs/architecture.md)."""
