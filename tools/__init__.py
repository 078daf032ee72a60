"""Command-line tools that measure hade_jax and write the repository's reports."""
