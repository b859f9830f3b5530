"""Module-level Flower apps for the deployment runtime (``flwr run``; see docs/federated.md).

The ServerApp reads its config file from the run config (``flwr run ... --run-config
"config='FILE'"``); each SuperNode reads its own from ``--node-config "config='FILE' node=I"``.
"""

from trainer.federated.master import make_server_app
from trainer.federated.node import make_client_app

server_app = make_server_app()
client_app = make_client_app()
