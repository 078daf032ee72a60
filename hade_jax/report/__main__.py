"""`python -m hade_jax.report`: see hade_jax/report/__init__.py."""

from hade_jax import report

if __name__ == "__main__":
  report.run()
