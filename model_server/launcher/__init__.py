"""The launch pipeline: start this host's servers from the fleet table, keep them up, stop them cleanly.

``pipeline`` plans and runs a host; ``supervisor`` keeps one server (its pure
decisions in ``lifecycle``); ``command`` builds the exact SGLang argv and env;
``gpu`` reads NVML and chooses memory fractions; ``processes`` spawns and kills
engine process groups; ``status_file``, ``rundir``, ``engine_log`` and
``redact`` are the files it writes and the secrets it keeps out of them.
"""
