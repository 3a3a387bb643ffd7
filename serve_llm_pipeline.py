"""The launch pipeline of this host.

    python serve_llm_pipeline.py [--config FILE] [--host-ip IP] [--only NAME ...] [--dry-run]

The same as `model-server serve` (see model_server/launcher/pipeline.py). With no
--config and no $MODEL_SERVER_CONFIG it runs configs/servers.toml on a host of
that table, else, on a machine with no NVIDIA GPU, the simulated fleet
configs/local.toml (see model_server/common/fleet_choice.py). Errors in the table or
options exit with status 2, like every model-server command.
"""

from __future__ import annotations

import sys

from model_server.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
