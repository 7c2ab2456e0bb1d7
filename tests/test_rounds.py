"""Multi-round behaviour of the real ServerApp + ClientApp, in process: class-incremental schedules,
sequential generator sharing, and resuming a run from its checkpoint."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from a2v_flower import config as C
from a2v_flower.checkpoints import load_tensors, save_tensors
from a2v_flower.data.schedule import check_schedule
from a2v_flower.records import from_record
from tests.inprocess import LocalGrid, run_server

FAST = ["diffusion.render_every=0", "train.local_epochs=1"]


def rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_schedule_trains_each_stage_replays_old_classes_and_reports_forgetting(make_cfg, tmp_path, task_identity,
                                                                              caplog):
    cfg = make_cfg("+experiment=class_incremental", "num_rounds=3", *FAST, "replay.synthetic_samples_per_class=4")
    cfg.schedule = {0: [{"from_round": 1, "classes": ["dog"]}, {"from_round": 2, "classes": ["rooster"]}]}
    site_log = logging.getLogger("a2v_flower.client_app")  # the package logger feeds Flower's handlers only
    site_log.addHandler(caplog.handler)
    try:
        run_server(cfg, tmp_path / "run")
    finally:
        site_log.removeHandler(caplog.handler)
    trains, evals = rows(tmp_path / "run", "train"), rows(tmp_path / "run", "eval")
    counts = {r["round"]: r["sites"]["0"] for r in trains}
    assert counts[1]["synthetic"] == 0 and counts[2]["synthetic"] > 0  # round 2 replays dog (and others' classes)
    assert "[Client 0] Detected new classes: ['rooster']" in caplog.text
    assert "rooster" not in evals[0]["seen_classes"] and "rooster" in evals[1]["seen_classes"]
    assert set(evals[0]["seen_classes"]) == {"dog", "crying_baby", "sneezing", "clock_tick", "crackling_fire",
                                          "helicopter", "chainsaw"}  # unscheduled sites: all their classes
    assert set(evals[1]["forgetting_per_class"]) == set(evals[0]["seen_classes"])  # classes seen earlier
    assert all(0 <= f <= 1 for f in evals[1]["forgetting_per_class"].values())
    assert evals[1]["forgetting"] == pytest.approx(sum(evals[1]["forgetting_per_class"].values())
                                                   / len(evals[1]["forgetting_per_class"]))


@pytest.mark.parametrize("stages,match", [
    ({0: [{"from_round": 2, "classes": ["dog"]}]}, r"schedule.0\[0\].from_round=2 is not allowed; expected 1"),
    ({0: [{"from_round": 1, "classes": ["chainsaw"]}]}, r"names 'chainsaw', which site 0 holds no clips of"),
    ({5: [{"from_round": 1, "classes": ["dog"]}]}, r"site 5 is not allowed; expected a site id 0..2"),
    ({0: [{"from_round": 1, "classes": ["dog"]}, {"from_round": 1, "classes": ["rain"]}]},
     r"schedule.0\[1\].from_round=1 is not allowed; expected an integer > 1"),
    ({0: [{"from_round": 1, "classes": ["dog"]}, {"from_round": 9, "classes": ["rain"]}]}, "after the last round"),
])
def test_bad_schedules_are_refused_before_training(stages, match):
    held = [["dog", "rain", "rooster"], ["cat"], ["chainsaw"]]
    with pytest.raises(ValueError, match=match):
        check_schedule(stages, held, num_rounds=4)


def _step(state: dict) -> int:
    return max(int(v) for k, v in state.items() if k.endswith(".step"))


def test_sequential_sharing_hands_one_state_from_site_to_site(make_cfg, tmp_path, task_identity):
    cfg = make_cfg("generator=cvae", "generator.epochs=1", "sharing=sequential", *FAST)
    grid = run_server(cfg, tmp_path / "run")
    passes = [(m, r) for m, r in zip(grid.sent, grid.replies) if m.metadata.message_type == "train.generators"]
    assert [int(r.content["metrics"]["site"]) for _, r in passes] == [0, 1, 2] * cfg.num_rounds  # by site id
    for (_, out), (nxt, _) in zip(passes, passes[1:]):  # what one site returns is exactly what the next gets
        got, given = from_record(out.content["generators"]), from_record(nxt.content["shared_generators"])
        assert got.keys() == given.keys() and all(torch.equal(got[k], given[k]) for k in got)
    for msg, reply in passes[1:]:  # AdamW steps accumulate across sites and rounds: never averaged or reset
        before = _step(from_record(msg.content["shared_generators"]))
        after = _step(from_record(reply.content["generators"]))
        assert after > before
    assert "shared_generators" not in passes[0][0].content  # round 1, first site: nothing trained yet
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    last = from_record(passes[-1][1].content["generators"])
    final = from_record(trains[-1].content["shared_generators"])
    assert all(torch.equal(last[k], final[k]) for k in last)  # the train messages carry the final state
    assert rows(tmp_path / "run", "train")[-1]["gen_frechet"] > 0
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("query.prepare") == 3 and kinds.index("train") > max(  # every site embeds before round 1
        i for i, k in enumerate(kinds) if k == "query.prepare")
    (prepared,) = rows(tmp_path / "run", "prepare")
    assert set(prepared["sites"]) == {"0", "1", "2"} and prepared["clips"] == sum(
        s["clips"] for s in prepared["sites"].values()) > 0
    down = [m for m in grid.sent if m.metadata.message_type in ("train", "evaluate")]
    assert cfg.adapter.wire == "float16" and len(down) == 2 * 3 * cfg.num_rounds  # the default wire dtype
    assert all({a.dtype for a in m.content["arrays"].values()} == {"float16"} for m in down)  # adapters go down in it


RESUME = ["generator=gaussian", "granularity=per_class", "replay.refine_epochs=1",
          "replay.synthetic_samples_per_class=4", "num_rounds=3", *FAST]


def test_resumed_run_matches_the_uninterrupted_one(make_cfg, tmp_path, task_identity, caplog):
    cfg = make_cfg(*RESUME)
    full = tmp_path / "full"
    flower = logging.getLogger("flwr")  # the package logs through Flower's handlers (tracking.use_flower_logging)
    flower.addHandler(caplog.handler)
    try:
        run_server(cfg, full)
    finally:
        flower.removeHandler(caplog.handler)
    # one line per round, whose top-1 shows its grain: hits of held-out clips
    for r in rows(full, "eval"):
        hits = round(r["top1"] * r["num_examples"])
        assert f"round {r['round']}/3: top-1 {r['top1']:.3f} ({hits}/{r['num_examples']} clips) | top-5" in caplog.text
    # a crash after round 2: the run folder as it was then (round 3's checkpoint and site states not yet written)
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    for f in [*crashed.glob("checkpoints/*_round_3.safetensors"), *crashed.glob("state/*_round_3.safetensors")]:
        f.unlink()
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["server_round_2.safetensors"]
    resumed_cfg = OmegaConf.merge(cfg, {"resume": str(crashed)})
    run_server(resumed_cfg, tmp_path / "launcher", LocalGrid(3, id_base=500))  # new node ids, fresh site state
    a, _ = load_tensors(full / "adapters.safetensors")
    b, _ = load_tensors(crashed / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ea, eb = rows(full, "eval"), rows(crashed, "eval")
    assert [r["round"] for r in eb] == [1, 2, 3]  # round 3 rows appended after the kept ones
    assert eb[-1]["top1"] == pytest.approx(ea[-1]["top1"]) and eb[-1]["forgetting"] == pytest.approx(ea[-1]["forgetting"])
    assert json.loads((crashed / "summary.json").read_text())["final_top1"] == pytest.approx(ea[-1]["top1"])


def test_resume_refuses_a_changed_config_or_a_corrupt_checkpoint(make_cfg, tmp_path, task_identity):
    cfg = make_cfg(*RESUME[:-3], "num_rounds=2", *FAST)
    run = tmp_path / "run"
    run_server(cfg, run)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"resume: seed=1 differs from the checkpoint's seed=0"):
        run_server(OmegaConf.merge(cfg, {"resume": str(run), "seed": 1, "num_rounds": 3}), tmp_path / "l1")
    with pytest.raises(ValueError, match="is at round 2 but num_rounds=2"):
        run_server(OmegaConf.merge(cfg, {"resume": str(run)}), tmp_path / "l2")
    # a checkpoint written before the adapters' input standardisation and token embedding: no such keys, no
    # input_norm tensors, no token embeddings
    old = tmp_path / "old"
    shutil.copytree(run, old)
    ckpt = old / "checkpoints" / "server_round_2.safetensors"
    tensors, meta = load_tensors(ckpt)
    del meta["resume_keys"]["adapter"]["normalise"], meta["resume_keys"]["adapter"]["token_embedding"]
    save_tensors(ckpt, {k: v for k, v in tensors.items() if not k.startswith("input_norm/")
                        and not k.endswith(".token_embedding")}, meta)
    with pytest.raises(ValueError, match=r"before the adapters' input standardisation and token embedding: resume "
                                         r"it with adapter.normalise=false adapter.token_embedding=false"):
        run_server(OmegaConf.merge(cfg, {"resume": str(old), "num_rounds": 3}), tmp_path / "l4")
    run_server(OmegaConf.merge(cfg, {"resume": str(old), "num_rounds": 3,
                                     "adapter": {"normalise": False, "token_embedding": False}}), tmp_path / "l5")
    assert json.loads((old / "summary.json").read_text())["completed"]
    (run / "checkpoints" / "server_round_2.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="server_round_2.safetensors is corrupt"):
        run_server(OmegaConf.merge(cfg, {"resume": str(run), "num_rounds": 3}), tmp_path / "l3")
    assert (run / "metrics.jsonl").read_text() == before  # nothing already saved was touched


def test_proximal_term_reaches_the_sites(make_cfg, tmp_path, task_identity):
    drift, loss = {}, {}
    for mu in (0.0, 1000.0):
        cfg = make_cfg("train.loss=mse+contrastive", f"train.proximal_mu={mu}", "train.absent_scale=0.5",
                       "num_rounds=1", "diffusion.render_every=0", "train.local_epochs=3")
        grid = run_server(cfg, tmp_path / f"mu{mu}")
        # site 0's train message and reply (Flower samples the nodes in no fixed order)
        i = next(i for i, m in enumerate(grid.sent) if m.metadata.message_type == "train"
                 and grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] == 0)
        sent, back = (from_record(m.content["arrays"]) for m in (grid.sent[i], grid.replies[i]))
        drift[mu] = sum(float((sent[k] - back[k]).pow(2).sum()) for k in sent)
        loss[mu] = float(grid.replies[i].content["metrics"]["train_loss"])
    # the site trained, held nearer the global adapters; its reported loss includes the proximal term
    assert 0 < drift[1000.0] < 0.5 * drift[0.0]
    assert loss[1000.0] > 10 * loss[0.0]


def test_groups_noniid_experiment_runs_its_recipe(make_cfg, tmp_path, task_identity):
    cfg = make_cfg("+experiment=groups_noniid", "num_rounds=2", *FAST)
    assert cfg.train.loss == "mse+contrastive" and cfg.federation.num_sites == 5
    assert cfg.replay.samples_per_class == 300  # hard data needs them (BENCHMARKS.md, issue 32 on main after 28)
    grid = run_server(cfg, tmp_path / "run")
    trains = rows(tmp_path / "run", "train")
    assert {int(r.content["metrics"]["site"]) for r in grid.replies} == set(range(5))
    assert cfg.generator.covariance == "lowrank" and cfg.strategy.aggregation == "avg"
    assert all(r["server/adapter_finetuning_loss"] > 0 and r["server/synthetic_samples"] > 0 for r in trains)
    assert len(rows(tmp_path / "run", "eval")) == 2


def _site_log(caplog, *names):
    """Route these package loggers (which feed Flower's handlers only) to caplog too."""
    for name in names:
        logging.getLogger(name).addHandler(caplog.handler)
    caplog.set_level("INFO")


def test_sequential_sharing_reports_the_resets_of_a_class_incremental_run(make_cfg, tmp_path, task_identity,
                                                                         caplog):
    cfg = make_cfg("+experiment=class_incremental", "generator=cvae", "granularity=unified", "generator.epochs=2",
                   "sharing=sequential", "num_rounds=2", "replay.synthetic_samples_per_class=4", *FAST)
    cfg.schedule = {0: [{"from_round": 1, "classes": ["dog"]}, {"from_round": 2, "classes": ["rooster"]}]}
    _site_log(caplog, "a2v_flower.client_app", "a2v_flower.site_generators")
    try:
        run_server(cfg, tmp_path / "run")
    finally:
        for name in ("a2v_flower.client_app", "a2v_flower.site_generators"):
            logging.getLogger(name).removeHandler(caplog.handler)
    first, second = (r["sites"] for r in rows(tmp_path / "run", "train"))
    assert all(s["resets"] == 0 and s["generator_loss"] > 0 for s in first.values())  # the pass's losses arrive
    assert all(s["generator_loss"] > 0 for s in second.values())
    # round 2: site 0 meets rooster, so the shared unified generator is reset; dog has left site 0's stage,
    # and "quality before" is measured against the statistics site 0 kept of dog
    assert second["0"]["resets"] == 1 and second["1"]["resets"] == second["2"]["resets"] == 0
    assert second["0"]["reset_frechet_before"] > 0 and second["0"]["reset_frechet_after"] > 0
    assert "[Client 0] Resetting the unified generator (new classes ['rooster'], all layers): quality before " \
           "mean_l2=" in caplog.text
    assert "[Client 0] Generator reset complete: the unified generator retrained, quality after mean_l2=" in caplog.text
    assert "n/a" not in caplog.text


def test_scheduled_reset_through_the_apps_reports_resets_and_loss_components(make_cfg, tmp_path, task_identity):
    cfg = make_cfg("generator=cvae", "generator.epochs=2", "reset=off", "reset.every_rounds=1", *FAST)
    run_server(cfg, tmp_path / "run")
    first, second = rows(tmp_path / "run", "train")
    assert [s["resets"] for s in first["sites"].values()] == [0, 0, 0]
    assert [s["resets"] for s in second["sites"].values()] == [1, 1, 1]  # every_rounds=1: every key at round 2
    for row in (first, second):
        for s in row["sites"].values():
            g = s["generators"]["unified"]  # loss components and sample statistics per key, per round
            assert g["loss"] == pytest.approx(g["recon"] + g["kl_beta"] * g["kl"], rel=1e-5)
            assert s["generator_loss"] == pytest.approx(g["loss"])
            assert g["sample_min"] < g["sample_mean"] < g["sample_max"] and g["sample_std"] > 0
            assert g["diversity"] > 0 and s["gen_diversity_fake"] == pytest.approx(g["diversity"])
    assert all(s["reset_frechet_before"] > 0 and s["reset_frechet_after"] > 0 for s in second["sites"].values())


def test_server_evaluation_scores_clips_no_site_holds(make_cfg, tmp_path, task_identity):
    """evaluate.mode=server: a seeded share of every class stays on the server, no site holds or scores it, and
    every round's eval row is the global adapters on those clips; federated eval rows say how many held-out clips
    are of classes the scoring site trained (trained_here)."""
    from a2v_flower.data.site import federation, server_clips

    cfg = make_cfg("evaluate.mode=server", "evaluate.server_share=0.25", "num_rounds=2", *FAST)
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    held = server_clips(clips, sites)
    assert len(held) == 2 * len(classes)  # 8 clips per class: 2 held out each, in no site
    assert {c.category for c in held} == set(classes) and not {c.path for c in held} & {
        clips[i].path for s in sites for i in s}
    grid = run_server(cfg, tmp_path / "server")
    assert "evaluate" not in {m.metadata.message_type for m in grid.sent}
    evals = rows(tmp_path / "server", "eval")
    assert [r["round"] for r in evals] == [1, 2] and all(r["num_examples"] == len(held) for r in evals)
    assert set(evals[-1]["sites"]) == {"server"} and 0 <= evals[-1]["top1"] <= 1
    federated = make_cfg("num_rounds=1", *FAST)
    run_server(federated, tmp_path / "federated")
    (row,) = rows(tmp_path / "federated", "eval")
    assert row["trained_here"] == 1.0 and all(s["trained_here"] == s["n"] for s in row["sites"].values())


def test_one_shot_experiment_trains_the_adapters_on_the_server_only(make_cfg, tmp_path, task_identity):
    """+experiment=one_shot: one round; sites fit their lowrank class models and return the adapters they were
    sent, untouched; the server alone trains the global adapters on the models' samples (refinement)."""
    assert C.compose_config(["+experiment=one_shot"]).num_rounds == 1            # the test config shrinks rounds
    cfg = make_cfg("+experiment=one_shot", "num_rounds=1", "replay.samples_per_class=20", "replay.refine_epochs=2",
                   *FAST)
    assert cfg.generator.covariance == "lowrank" and cfg.mode.generator_only_mode
    grid = run_server(cfg, tmp_path / "run")
    sent = {m.metadata.dst_node_id: m for m in grid.sent if m.metadata.message_type == "train"}
    replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(replies) == 5
    for reply in replies:
        back, given = reply.content["arrays"].to_torch_state_dict(), sent[reply.metadata.src_node_id]
        assert all(torch.equal(back[k], v) for k, v in given.content["arrays"].to_torch_state_dict().items())
        assert reply.content["metrics"]["train_loss"] == 0.0
    (train,) = rows(tmp_path / "run", "train")
    assert train["server/adapter_finetuning_loss"] > 0 and train["server/synthetic_samples"] >= 20 * 5
    assert len(rows(tmp_path / "run", "eval")) == 1
