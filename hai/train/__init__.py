"""The training run: the loop over steps (``trainer``) and what it records (``metrics``)."""
