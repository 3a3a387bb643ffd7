"""A fake ``sglang`` package for the launcher's tests: ``python -m sglang.launch_server`` (see launch_server.py)."""
