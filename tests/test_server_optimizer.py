"""FedAvgM's server step (strategy.server_lr / server_momentum): FedAvg when off, the hand-computed step when on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from a2v_flower.records import to_record
from a2v_flower.server_optimizer import ServerMomentum
from tests.test_apps import make_strategy, replies


def record(v: float, n: int = 3):
    return to_record({"w": torch.full((n,), v), "steps": torch.tensor([7])})


def test_default_is_fedavg_exactly():
    averaged = record(2.0)
    assert ServerMomentum().step(record(1.0), averaged) is averaged


def test_learning_rate_scales_the_averaged_update():
    new = ServerMomentum(lr=3.0).step(record(1.0), record(1.5))
    assert np.allclose(new["w"].numpy(), 1.0 + 3.0 * 0.5) and new["w"].dtype == "float32"
    assert new["steps"].numpy().tolist() == [7]  # integer arrays are the average's


def test_momentum_accumulates_over_rounds():
    opt = ServerMomentum(lr=1.0, momentum=0.9)
    first = opt.step(record(0.0), record(1.0))           # v = -1: as FedAvg in round 1
    second = opt.step(first, record(2.0))                # v = 0.9 * -1 + (1 - 2) = -1.9
    assert np.allclose(first["w"].numpy(), 1.0) and np.allclose(second["w"].numpy(), 1.0 + 1.9)


@pytest.mark.parametrize("lr,momentum,match", [(0.0, 0.0, "strategy.server_lr=0.0"),
                                               (1.0, 1.0, "strategy.server_momentum=1.0")])
def test_bad_values_are_named(lr, momentum, match):
    with pytest.raises(ValueError, match=match):
        ServerMomentum(lr, momentum)


def test_strategy_steps_from_the_adapters_it_sent(task_identity):
    """The strategy applies the step to its own average: sent 1, sites average 2, lr 2 -> 3."""
    strategy = make_strategy("avg", server_opt=ServerMomentum(lr=2.0))
    strategy.sent_arrays = to_record({"w": torch.full((2,), 1.0)})  # what configure_train keeps
    msg = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    arrays, _ = strategy.aggregate_train(1, replies([{"w": torch.full((2,), v)} for v in (1.5, 2.5)], [1, 1], msg))
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 3.0))
