"""The launch pipeline: start this host's servers from the fleet table, keep them up, stop them cleanly.

``pipeline`` plans and runs a host (and its ``--dry-run``); ``supervisor`` is
the thin loop that keeps one server, performing what the pure ``steps`` decide
(``events`` are the words between them; ``lifecycle`` the server's states and
restart decision); ``command`` builds the exact SGLang argv and env;
``gpu_memory`` decides on GPU readings (free, which memory fraction) that
``gpu`` takes from NVML or a simulated inventory; ``processes`` spawns and
kills engine process groups; ``status_file``, ``rundir``, ``engine_log`` and
``redact`` are the files it writes and the secrets it keeps out of them.
"""
