"""Generator lifecycle through the ClientApp/strategy: modes, two-run workflow, sharing, checkpoints."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from a2v_flower import config as C
from a2v_flower import client_app
from a2v_flower.rendering import pipelines
from a2v_flower.models.generators import build_generator, condition_for
from a2v_flower.server_generators import ServerGenerators
from a2v_flower.site_generators import train_site_generators
from tests.test_apps import context, message, setup

GEN = ["generator=gaussian", "granularity=per_class"]


def gen_state(ctx) -> dict:
    return {k: v for k, v in ctx.state.items() if k.startswith("gen/")}


def test_generator_only_mode_trains_generators_not_adapters(make_cfg, task_identity, tmp_path):
    cfg = make_cfg(*GEN, "mode=generator_training", f"generator_checkpoint.dir={tmp_path}/gens")
    _, targets, adapters = setup(cfg)
    built = pipelines.PIPELINES_BUILT
    reply = client_app.train(message(cfg, adapters, targets), context(0))
    sent = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], v.to(sent[k].dtype)) for k, v in adapters.state_dict().items())  # untouched
    assert len(reply.content["generators"]) > 0
    m = reply.content["metrics"]
    assert 0 <= m["gen_precision"] <= 1 and m["gen_frechet"] >= 0 and m["gen_classes_measured"] >= 1
    assert pipelines.PIPELINES_BUILT == built  # no pipeline anywhere
    names = sorted(p.name for p in (tmp_path / "gens").iterdir())
    assert names and all(n.startswith("gaussian_per_class_node0_class_") for n in names)


def test_two_run_workflow_loads_what_run_one_saved(make_cfg, task_identity, tmp_path, caplog):
    ck = f"generator_checkpoint.dir={tmp_path}/gens"
    cfg1 = make_cfg(*GEN, "mode=generator_training", ck)
    _, targets, adapters = setup(cfg1)
    ctx1 = context(1)
    client_app.train(message(cfg1, adapters, targets), ctx1)
    cfg2 = make_cfg(*GEN, "mode=use_pretrained", ck)
    ctx2 = context(1)  # a new run: empty state
    with caplog.at_level("INFO"):
        reply = client_app.train(message(cfg2, adapters, targets), ctx2)
    assert "loaded" in caplog.text and "pretrained generators" in caplog.text
    s1, s2 = gen_state(ctx1), gen_state(ctx2)
    assert s1.keys() == s2.keys()
    for k in s1:
        a, b = s1[k].to_torch_state_dict(), s2[k].to_torch_state_dict()
        assert all(torch.equal(a[n], b[n]) for n in a)  # not retrained in run 2 (training mode off)
    assert reply.content["metrics"]["train_loss"] > 0  # adapters do train in run 2


def test_pretrained_with_a_corrupt_file_fails_whole(make_cfg, task_identity, tmp_path):
    ck = f"generator_checkpoint.dir={tmp_path}/gens"
    cfg1 = make_cfg(*GEN, "mode=generator_training", ck)
    _, targets, adapters = setup(cfg1)
    client_app.train(message(cfg1, adapters, targets), context(2))
    victim = sorted((tmp_path / "gens").iterdir())[-1]
    victim.write_bytes(b"not a checkpoint")
    ctx = context(2)
    with pytest.raises(ValueError, match=victim.name):
        client_app.train(message(make_cfg(*GEN, "mode=use_pretrained", ck), adapters, targets), ctx)
    assert not gen_state(ctx)  # nothing half-loaded


def test_mismatched_granularity_names_both_sides(make_cfg, task_identity, tmp_path):
    ck = [f"generator_checkpoint.dir={tmp_path}/gens", "generator_checkpoint.base_name=g"]
    cfg1 = make_cfg("generator=gaussian", "granularity=unified", "mode=generator_training", *ck)
    _, targets, adapters = setup(cfg1)
    client_app.train(message(cfg1, adapters, targets), context(0))
    (tmp_path / "gens" / "g_node0.safetensors").rename(tmp_path / "gens" / "g_node0_class_dog.safetensors")
    cfg2 = make_cfg("generator=gaussian", "granularity=per_class", "mode=use_pretrained", *ck)
    with pytest.raises(ValueError, match="granularity is 'unified' in the file but 'per_class' was asked"):
        client_app.train(message(cfg2, adapters, targets), context(0))


def shared_server(classes: list[str], targets: dict, spec) -> ServerGenerators:
    """The server's side of generators shared by averaging (sharing=averaged, unified), for `spec`."""
    conf = C.defaults(f"generator={spec.type}", "sharing=averaged")
    return ServerGenerators(classes=classes, class_targets=targets, token_shape=(4, 8), make_adapters=lambda: None,
                            train_spec=conf.train, options=conf.replay, seed=0, server_gen=None, kd=False,
                            replay=dataclasses.replace(C.replay_spec(conf, classes), generator=spec))


def test_shared_generators_are_one_state_with_averaged_moments(task_identity):
    spec = C.spec("generator", type="cvae", epochs=2)
    classes = ["dog", "rain"]
    targets = {"pooled": torch.randn(2, 12)}
    gens = shared_server(classes, targets, spec)
    for site, seed in ((0, 0), (1, 1), (2, 2)):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(20, 4, 8, generator=g), torch.tensor([0, 1] * 10)
        states, _ = train_site_generators({}, set(), x, y, classes, "unified", None, spec, targets, True)
        gens.generators[site] = states
        gens.class_stats[site] = {"counts": torch.tensor([10.0, 10.0])}
    before = {s: gens.generators[s]["unified"] for s in range(3)}
    gens.after_aggregation(1, None, {})
    shared = gens.shared["unified"]
    assert all(gens.generators[s] is gens.shared for s in range(3))  # no per-site copies kept
    moment = next(k for k in shared if k.endswith("exp_avg_sq"))
    assert torch.allclose(shared[moment], sum(before[s][moment] for s in range(3)) / 3)


def test_early_stopping_uses_the_site_validation_split(make_cfg, task_identity, caplog):
    cfg = make_cfg("generator=cvae", "generator.epochs=200", "generator.early_stopping_patience=2",
                   "generator.lr=0.05", "data.splits={train: 0.5, val: 0.3, test: 0.2}")
    _, targets, adapters = setup(cfg)
    gen_log = logging.getLogger("a2v_flower.models.generators")  # the package logger feeds Flower's handlers only
    gen_log.addHandler(caplog.handler)
    caplog.set_level("INFO")
    try:
        client_app.train(message(cfg, adapters, targets), context(0))
    finally:
        gen_log.removeHandler(caplog.handler)
    assert "generator early stop at epoch" in caplog.text  # val loss stopped improving well before 200 epochs
    assert "without validation data" not in caplog.text


def test_checkpoint_save_false_trains_without_writing_files(make_cfg, task_identity, tmp_path):
    cfg = make_cfg(*GEN, "mode=generator_training", f"generator_checkpoint.dir={tmp_path}/gens",
                   "generator_checkpoint.save=false")
    _, targets, adapters = setup(cfg)
    ctx = context(0)
    reply = client_app.train(message(cfg, adapters, targets), ctx)
    assert gen_state(ctx) and len(reply.content["generators"]) > 0  # trained and sent
    assert not (tmp_path / "gens").exists()


def _steps(ctx) -> int:
    return max(int(v) for rec in gen_state(ctx).values() for k, v in rec.to_torch_state_dict().items()
               if k.endswith(".step"))


def test_pretrained_generators_keep_training_when_training_mode_is_on(make_cfg, task_identity, tmp_path, caplog):
    ck = [f"generator_checkpoint.dir={tmp_path}/gens", "generator.epochs=1"]
    cfg1 = make_cfg("generator=cvae", "mode=generator_training", *ck)
    _, targets, adapters = setup(cfg1)
    ctx1 = context(0)
    client_app.train(message(cfg1, adapters, targets), ctx1)
    cfg2 = make_cfg("generator=cvae", "mode.use_pretrained_generators=true", *ck)  # load, then train on
    ctx2 = context(0)
    with caplog.at_level("INFO"):
        client_app.train(message(cfg2, adapters, targets, rnd=2), ctx2)
    assert "loaded 1 pretrained generators" in caplog.text
    assert _steps(ctx2) == 2 * _steps(ctx1)  # the loaded AdamW state continued: one more round of the same steps


def _rewrite(path, tensors_of):
    """Replace a checkpoint's tensors (keeping its metadata) by `tensors_of(old tensors)`."""
    from a2v_flower.checkpoints import load_tensors, save_tensors

    tensors, meta = load_tensors(path)
    save_tensors(path, tensors_of(tensors, meta), meta)


def test_loading_refuses_another_kind_or_changed_shapes_before_anything_changes(make_cfg, task_identity, tmp_path):
    from a2v_flower.models.generators import build_generator

    ck = [f"generator_checkpoint.dir={tmp_path}/gens", "generator_checkpoint.base_name=g", "generator.epochs=1"]
    cfg1 = make_cfg("generator=cvae", "mode=generator_training", *ck)
    _, targets, adapters = setup(cfg1)
    client_app.train(message(cfg1, adapters, targets), context(0))
    path = tmp_path / "gens" / "g_node0.safetensors"
    cfg2 = make_cfg("generator=cvae", "mode=use_pretrained", *ck)
    # a gan's tensors under the cvae file's metadata
    _rewrite(path, lambda t, meta: build_generator(C.spec("generator", type="gan"), tuple(meta["token_shape"])).state_tensors())
    ctx = context(0)
    with pytest.raises(ValueError) as err:
        client_app.train(message(cfg2, adapters, targets), ctx)
    assert "g_node0.safetensors: tensors ['model.d_net.0.bias'" in str(err.value)
    assert "in the file are not in the configured generator" in str(err.value)
    assert "of the configured generator are not in the file" in str(err.value)
    assert not gen_state(ctx)  # nothing loaded
    # the cvae's own tensors with one weight widened (as if the condition or token width had changed)
    client_app.train(message(cfg1, adapters, targets), context(0))
    want = None

    def widen(t, meta):
        nonlocal want
        want = list(t["model.enc.0.weight"].shape)
        return t | {"model.enc.0.weight": torch.zeros(want[0], want[1] + 1)}

    _rewrite(path, widen)
    with pytest.raises(ValueError, match=rf"g_node0.safetensors: model.enc.0.weight has shape \[{want[0]}, "
                                         rf"{want[1] + 1}\] in the file but \[{want[0]}, {want[1]}\] was asked"):
        client_app.train(message(cfg2, adapters, targets), ctx)
    assert not gen_state(ctx)


def test_averaged_gaussian_generators_pool_the_class_moments_of_all_sites(task_identity):
    """Gaussian states hold per-class sums in the order a site met its classes and in its own standardised
    space; sharing=averaged pools them, so the shared state's class moments are those of all the data."""
    spec, classes = C.spec("generator", type="gaussian"), ["dog", "rain", "cow"]
    targets = {"pooled": torch.randn(3, 12, generator=torch.Generator().manual_seed(0))}
    gens = shared_server(classes, targets, spec)
    g = torch.Generator().manual_seed(1)
    data = {0: (torch.randn(30, 4, 8, generator=g), torch.tensor([1, 0] * 15)),              # dog, rain
            1: (3 + 2 * torch.randn(45, 4, 8, generator=g), torch.tensor([2, 1, 2] * 15))}  # cow, rain: other scale
    for site, (x, y) in data.items():
        gens.generators[site], _ = train_site_generators({}, set(), x, y, classes, "unified", None, spec, targets,
                                                         True)
        gens.class_stats[site] = {"counts": torch.bincount(y, minlength=3).float()}
    gens.after_aggregation(1, None, {})
    gen = build_generator(spec, (4, 8))
    gen.load_state_tensors(gens.shared["unified"])
    x, y = torch.cat([x for x, _ in data.values()]), torch.cat([y for _, y in data.values()])
    mean0, std0 = gen.norm.mean.flatten().double(), gen.norm.std.flatten().double()
    for c in range(3):
        mean, var = gen._moments(condition_for(gen, targets, torch.tensor([c])), 1)
        rows = x[y == c].flatten(1).double()
        assert torch.allclose(mean0 + std0 * mean[0], rows.mean(0), atol=1e-4)
        assert torch.allclose(std0 ** 2 * var[0], rows.var(0, unbiased=False), atol=1e-4)
    assert gens.shared["unified"]["seen"].tolist() == [0, 1, 2]
    # counts: the mean over the states, so that sites re-adding their clips each round do not multiply them
    assert gens.shared["unified"]["model.count"].sum().item() == pytest.approx((30 + 45) / 2)
