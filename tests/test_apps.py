"""ClientApp and strategy, called directly with Flower Messages: payloads, aggregation math, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from a2v_flower import client_app
from a2v_flower import config as C
from a2v_flower.cache import TensorCache
from a2v_flower.data.site import federation
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.audio_encoder import encoder_dim
from a2v_flower.models.text_encoders import class_targets
from a2v_flower.cache import sha1_of
from a2v_flower.metrics import aggregate_metrics
from a2v_flower.nodes import RoundFailed, learn_sites
from a2v_flower.records import payload_bytes, to_record
from a2v_flower.server_generators import ServerGenerators
from a2v_flower.strategy import A2VStrategy
from tests.inprocess import LocalGrid


class NullTracker:
    def __init__(self):
        self.history = []

    def log(self, round_, kind, metrics):
        self.history.append({"round": round_, "kind": kind, **metrics})


def setup(cfg):
    _, classes, _ = federation(C.data_spec(cfg), C.partition_spec(cfg))
    targets = class_targets(classes, cfg.prompt_template, cfg.diffusion.type, C.validate(cfg).model.text, cfg.diffusion.t5_seq_len,
                            TensorCache(f"{cfg.paths.cache_dir}/targets"))
    adapters = build_adapters(encoder_dim(C.validate(cfg).model.audio), targets, seed=0,
                              **C.adapter_keywords(cfg))  # as the ServerApp builds them
    return classes, targets, adapters


def message(cfg, adapters, targets, kind="train", rnd=1, with_targets=True):
    """A server message; the first one of a node also carries the class targets and the run config."""
    text = OmegaConf.to_yaml(cfg)
    content = RecordDict({"arrays": ArrayRecord(adapters.state_dict()),
                          "config": ConfigRecord({"config-sha1": sha1_of(text)[:12], "server-round": rnd})})
    if with_targets:
        content["targets"], content["run-config"] = to_record(targets), ConfigRecord({"yaml": text})
        shape = (cfg.model.audio.tokens, encoder_dim(C.validate(cfg).model.audio))  # the adapters' input standardisation
        content["input_norm"] = to_record({"mean": torch.zeros(shape), "std": torch.ones(shape)})
    return Message(content=content, dst_node_id=7, message_type=kind)


def context(site=0):
    return Context(run_id=1, node_id=7, node_config={"partition-id": site, "num-partitions": 3},
                   state=RecordDict(), run_config={})


@pytest.mark.parametrize("diffusion", ["sd", "flux"])
def test_train_reply_carries_only_adapter_weights(make_cfg, task_identity, diffusion):
    cfg = make_cfg(f"diffusion={diffusion}")
    _, targets, adapters = setup(cfg)
    reply = client_app.train(message(cfg, adapters, targets), context())
    sent = reply.content["arrays"]
    assert set(sent.keys()) == {n for n, _ in adapters.named_parameters()}  # no buffers, no encoder
    assert sorted(reply.content.keys()) == ["arrays", "class_stats", "metrics"]
    assert reply.content["metrics"]["num-examples"] > 0
    new = sent.to_torch_state_dict()
    assert any(not torch.equal(new[k], v.to(new[k].dtype)) for k, v in adapters.state_dict().items())  # trained
    encoder = next(iter(client_app._ENCODERS.values()))
    if encoder.model is not None:
        assert not any(p.requires_grad for p in encoder.model.parameters())  # frozen
    stats = reply.content["class_stats"]
    assert {k.split("/")[0] for k in stats.keys()} == {"audio_mean", "audio_var", "counts", "seen"}
    # adapter-output means (a 77x768 tensor per class for SD) travel only for the server generator
    with_gen = client_app.train(message(make_cfg(f"diffusion={diffusion}", "server_generator.epochs=1",
                                                 "strategy=kd"), adapters, targets), context())
    assert {k.split("/")[0] for k in with_gen.content["class_stats"].keys()} == {"out", "audio_mean", "audio_var",
                                                                                  "counts", "seen"}


def test_targets_are_kept_for_later_rounds_but_not_per_node(make_cfg, task_identity, monkeypatch):
    cfg = make_cfg()
    _, targets, adapters = setup(cfg)
    ctx = context()
    client_app.train(message(cfg, adapters, targets), ctx)
    assert "targets" not in ctx.state  # in simulation every node's state sits in the ServerApp's process
    monkeypatch.setattr(client_app, "_TARGETS", {})  # another actor: the targets come from this node's disk
    reply = client_app.evaluate(message(cfg, adapters, targets, "evaluate", 2, with_targets=False), ctx)
    m = reply.content["metrics"]
    assert 0 <= m["top1"] <= m["top5"] <= 1 and sum(m["count_per_class"]) == m["num-examples"]
    other = make_cfg("train.lr=0.5")  # a run whose targets never came
    ctx2 = context()
    ctx2.state["run-config"] = ConfigRecord({"yaml": OmegaConf.to_yaml(other)})
    with pytest.raises(RuntimeError, match="site 0: no targets received from the server"):
        client_app.evaluate(message(other, adapters, targets, "evaluate", 2, with_targets=False), ctx2)
    with pytest.raises(RuntimeError, match="site 0: no run config received"):
        client_app.evaluate(message(cfg, adapters, targets, "evaluate", 2, with_targets=False), context())
    other = message(make_cfg("train.lr=0.5"), adapters, targets, "evaluate", 3, with_targets=False)
    with pytest.raises(RuntimeError, match=r"site 0: its run config \(sha1 \w+\) is not the server's"):
        client_app.evaluate(other, ctx)


def test_aggregation_none_keeps_site_adapters(make_cfg, task_identity):
    cfg = make_cfg("strategy=none")
    _, targets, adapters = setup(cfg)
    ctx = context()
    first = client_app.train(message(cfg, adapters, targets), ctx).content["arrays"].to_torch_state_dict()
    shape = (adapters["clip"].inp[1].in_features, targets, cfg.adapter.width, cfg.adapter.heads)
    fresh = build_adapters(*shape, 99, cfg.adapter.kind, cfg.adapter.rank, tokens=cfg.model.audio.tokens)
    reply = client_app.evaluate(message(cfg, fresh, targets, "evaluate"), ctx)  # server's arrays are ignored
    own = build_adapters(*shape, 0, cfg.adapter.kind, cfg.adapter.rank, tokens=cfg.model.audio.tokens)
    own.load_state_dict(first)
    assert reply.content["metrics"]["top1"] == pytest.approx(
        client_app.evaluate(message(cfg, own, targets, "evaluate"), context()).content["metrics"]["top1"])


def replies(weights: list[dict], counts: list[int], cfg_msg):
    out = []
    for i, (w, n) in enumerate(zip(weights, counts)):
        content = RecordDict({
            "arrays": to_record(w),
            "metrics": MetricRecord({"num-examples": n, "unit-weight": 1, "train_loss": 0.1, "site": i,
                                     "encoder_calls": 0, "skipped": 0, "synthetic": 0,
                                     "generator_loss": 0.0}),
            "class_stats": to_record({"counts": torch.ones(2)})})
        out.append(Message(content=content, reply_to=cfg_msg))
    return out


def make_strategy(aggregation: str, **kwargs) -> A2VStrategy:
    """A strategy over two classes with a one-number target, no generators; `kwargs` change its settings."""
    targets, conf = {"clip": torch.zeros(2, 1)}, C.defaults()
    gens = ServerGenerators(classes=["a", "b"], class_targets=targets, token_shape=(2, 4), make_adapters=lambda: None,
                            train_spec=conf.train, options=conf.replay, seed=0, replay=None, server_gen=None, kd=False)
    settings = dict(aggregation=aggregation, fraction_train=1.0, fraction_evaluate=1.0, num_sites=1, min_sites=1,
                    timeout=3600, handout={"targets": targets, "run-config": ""}, tracker=NullTracker(),
                    classes=["a", "b"], generators=gens, seen_fn=lambda rnd: {0, 1}, clip_images=lambda rnd: 0,
                    wire="float32", evaluate_on_sites=True, site_of_node={})
    return A2VStrategy(**(settings | kwargs))


@pytest.mark.parametrize("aggregation", ["avg", "uniform"])
def test_aggregation_matches_hand_computed_mean(task_identity, aggregation):
    ws = [{"w": torch.full((2, 3), v), "b": torch.tensor([v])} for v in (1.0, 2.0, 4.0)]
    counts = [10, 30, 60]
    strategy = make_strategy(aggregation)
    msg = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    rs = replies(ws, counts, msg)
    sent = [payload_bytes(r.content) for r in rs]  # adapters + class statistics, before they are set aside
    arrays, _ = strategy.aggregate_train(1, rs)
    got = arrays.to_torch_state_dict()["w"]
    assert [s["bytes_up"] for s in strategy.tracker.history[-1]["sites"].values()] == sent
    assert sent[0] > (6 + 1 + 2) * 4  # at least the raw float32 payload
    expected = (1 * 10 + 2 * 30 + 4 * 60) / 100 if aggregation == "avg" else (1 + 2 + 4) / 3
    assert torch.allclose(got, torch.full((2, 3), expected))
    assert len(strategy.generators.class_stats) == 3  # statistics kept aside, not averaged into the adapters


def test_float16_on_the_wire_is_averaged_in_float32(make_cfg, task_identity):
    cfg = make_cfg("adapter.wire=float16")
    _, targets, adapters = setup(cfg)
    sent = client_app.train(message(cfg, adapters, targets), context()).content["arrays"]
    assert {a.dtype for a in sent.values()} == {"float16"}
    strategy = make_strategy("avg", wire="float16")
    msg = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    ws = [{"w": torch.full((2,), v, dtype=torch.float16)} for v in (1.0, 2.0)]
    arrays, _ = strategy.aggregate_train(1, replies(ws, [1, 2], msg))
    assert arrays["w"].dtype == "float32" and torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 5 / 3))


def test_evaluate_pools_all_sites(task_identity):
    strategy = make_strategy("avg")
    msg = Message(content=RecordDict(), dst_node_id=1, message_type="evaluate")
    rows = [({"top1": 1.0, "top5": 1.0, "cosine": 0.5, "num-examples": 2, "site": 0,
              "correct_per_class": [2, 0], "count_per_class": [2, 0]}),
            ({"top1": 0.0, "top5": 1.0, "cosine": 0.3, "num-examples": 6, "site": 1,
              "correct_per_class": [0, 0], "count_per_class": [0, 6]})]
    out = strategy.aggregate_evaluate(1, [Message(content=RecordDict({"metrics": MetricRecord(r)}), reply_to=msg)
                                          for r in rows])
    assert out["top1"] == pytest.approx(0.25) and out["cosine"] == pytest.approx((0.5 * 2 + 0.3 * 6) / 8)
    logged = strategy.tracker.history[-1]
    assert logged["per_class"] == {"a": 1.0, "b": 0.0} and set(logged["sites"]) == {0, 1}


def test_targets_and_config_sent_once_per_node(task_identity):
    norm = {"mean": torch.full((2, 4), 0.5), "std": torch.full((2, 4), 2.0)}
    strategy = make_strategy("avg", handout={"targets": {"clip": torch.zeros(2, 1)}, "run-config": "seed: 3\n",
                                             "input_norm": norm})
    msgs = [Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train")
            for n in (1, 2)]
    first = strategy._with_targets(msgs)
    second = strategy._with_targets(msgs)
    assert all({"targets", "run-config", "input_norm"} <= set(m.content.keys()) for m in first)
    assert not any({"targets", "run-config", "input_norm"} & set(m.content.keys()) for m in second)
    assert np.array_equal(first[1].content["input_norm"]["std"].numpy(), np.full((2, 4), 2.0, dtype=np.float32))
    assert np.array_equal(first[0].content["targets"]["clip"].numpy(), np.zeros((2, 1)))
    assert first[1].content["run-config"]["yaml"] == "seed: 3\n"


def test_metric_aggregates_sum_counts_and_drop_ids():
    rows = [{"num-examples": 10, "unit-weight": 1, "site": 0, "train_loss": 1.0, "encoder_calls": 80,
             "correct_per_class": [1, 2]},
            {"num-examples": 30, "unit-weight": 1, "site": 1, "train_loss": 3.0, "encoder_calls": 0,
             "correct_per_class": [0, 5], "clip_images": 3}]
    records = [RecordDict({"metrics": MetricRecord(r)}) for r in rows]
    by_examples = aggregate_metrics(records, "num-examples")
    assert dict(by_examples) == {"num-examples": 40, "train_loss": pytest.approx(2.5), "encoder_calls": 80,
                                 "correct_per_class": [1, 7], "clip_images": 3}  # no site, no unit-weight
    assert aggregate_metrics(records, "unit-weight")["train_loss"] == pytest.approx(2.0)  # uniform: plain mean
    empty = [RecordDict({"metrics": MetricRecord({"num-examples": 0, "top1": v})}) for v in (0.2, 0.4)]
    assert aggregate_metrics(empty, "num-examples")["top1"] == pytest.approx(0.3)  # no weight: equal weights


def test_a_late_node_with_another_federation_size_is_refused():
    grid = LocalGrid(2)
    grid.contexts[102].node_config["num-partitions"] = 3  # started with another --node-config num-partitions
    known = {}
    with pytest.raises(RoundFailed, match=r"SuperNode 102 \(partition-id=1\) has num-partitions=3 but the "
                                          r"federation has 2 sites; start it with num-partitions=2"):
        learn_sites(grid, [101, 102], known, num_sites=2, timeout=10)
    assert known == {101: 0}  # the node that agrees is learnt
    learn_sites(grid, [101], known, num_sites=2, timeout=10)
    assert [m.metadata.dst_node_id for m in grid.sent] == [101, 102]  # a known node is not asked again
