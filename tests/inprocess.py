"""Run the real ServerApp and ClientApp in one process: a Grid that hands each message to the ClientApp
with that node's Context. Flower's transport is exercised by test_simulation/test_deployment; this lets
multi-round behaviour (schedules, sharing, resume) be tested in seconds."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from a2v_flower import client_app, server_app


class LocalGrid(Grid):
    """`num_sites` nodes (ids 101, 102, ... + `id_base`), each with partition-id i, its own state and any extra
    node config in `node_configs[i]`. A ClientApp that raises replies with an error, as Flower's would."""

    def __init__(self, num_sites: int, id_base: int = 100, node_configs: dict[int, dict] | None = None):
        self.contexts = {id_base + 1 + i: Context(run_id=1, node_id=id_base + 1 + i,
                                                  node_config={"partition-id": i, "num-partitions": num_sites,
                                                               **(node_configs or {}).get(i, {})},
                                                  state=RecordDict(), run_config={})
                         for i in range(num_sites)}
        self.sent: list[Message] = []      # every message the server sent, in order
        self.replies: list[Message] = []   # and the ClientApp's reply to each

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]):
        raise NotImplementedError("LocalGrid answers in send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LocalGrid answers in send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do when they push a message
            self.sent.append(msg)
            ctx = self.contexts[msg.metadata.dst_node_id]
            state = RecordDict(dict(ctx.state.items()))
            try:
                replies.append(client_app.app(msg, ctx))
            except Exception as err:  # noqa: BLE001 - Flower turns any ClientApp exception into an error reply
                ctx.state = state  # and keeps none of what the failed call changed
                replies.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                             f"{type(err).__name__}: {err}"), reply_to=msg))
            self.replies.append(replies[-1])
        return replies


def run_server(cfg, run_dir: Path, grid: LocalGrid | None = None, launch_id: str = "") -> LocalGrid:
    """Save `cfg` to <run_dir>/config.yaml and run the real ServerApp main on a LocalGrid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    OmegaConf.save(cfg, path)
    grid = grid or LocalGrid(cfg.federation.num_sites)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"config-file": str(path), "launch-id": launch_id})
    server_app.main(grid, ctx)
    return grid
