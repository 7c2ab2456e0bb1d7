"""ServerApp that runs FedAvg on one array (`array-floats` float32s) and records when each round's phases end.

Per-round timestamps (unix seconds) go to the run-config path `times-file` as JSON:
``{"start": t, "train_end": {round: t}, "round_end": {round: t}, "num_sites": n}``; `start` is taken
right before round 1 (FedAvg's initial `evaluate_fn` call), `round_end` after each round's evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round's training aggregation finishes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.train_end: dict[int, float] = {}

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        self.train_end[server_round] = time.time()
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds on all `num-sites` SuperNodes; write the timestamps."""
    rc = context.run_config
    n, rounds, floats = int(rc["num-sites"]), int(rc["num-server-rounds"]), int(rc.get("array-floats", 4))
    round_end: dict[int, float] = {}

    def stamp(server_round: int, arrays: ArrayRecord) -> None:
        round_end[server_round] = time.time()  # called before round 1 (0) and after every round
        return None

    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                           min_available_nodes=n)
    strategy.start(grid, ArrayRecord([np.zeros(floats, dtype=np.float32)]), num_rounds=rounds, evaluate_fn=stamp)
    if rc.get("times-file"):
        out = {"start": round_end.pop(0), "train_end": strategy.train_end, "round_end": round_end, "num_sites": n,
               "num_rounds": rounds, "array_floats": floats}
        path = Path(str(rc["times-file"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
