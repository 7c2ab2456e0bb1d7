"""Config composition: every group option composes and validates; bad values are named."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from a2v_flower import config as C

ROOT = Path(__file__).resolve().parents[1]
GROUPS = sorted(p.name for p in C.CONF_DIR.iterdir() if p.is_dir())


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS if g != "experiment"
                                          for p in sorted((C.CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes_and_validates(group, option, make_cfg):
    needs = {"vae": ["granularity=per_class"], "kd": ["generator=gaussian"], "generator_training": ["generator=gaussian"],
             "use_pretrained": ["generator=gaussian"], "averaged": ["generator=gaussian"],
             "sequential": ["generator=gaussian"], "pool": ["evaluate.mode=server"],
             "hf": ["data.path=/data/my_audiofolder"]}.get(option, [])
    cfg = make_cfg(f"{group}={option}", "data.root=/data/ESC-50", *needs)
    C.validate(cfg)
    assert OmegaConf.select(cfg, f"{group}") is not None


@pytest.mark.parametrize("experiment", [p.stem for p in (C.CONF_DIR / "experiment").glob("*.yaml")])
def test_every_experiment_composes(experiment, make_cfg):
    C.validate(make_cfg(f"+experiment={experiment}"))


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def run_commands(text: str) -> list[list[str]]:
    """Hydra overrides of every `a2v-run ...` line of a Markdown text (a line that starts with the command)."""
    lines = re.findall(r"^\s*(?:\.venv/bin/)?a2v-run(.*)$", text, flags=re.M)
    return [[a for a in shlex.split(line.split("#")[0]) if a not in ("-m", "--multirun")] for line in lines]


def readme_overrides() -> list:
    """Every `a2v-run` command of the README and of each docs/*.md page, named by its page."""
    return [pytest.param(o, id=f"{page.name}:{i}")
            for page in DOCS for i, o in enumerate(run_commands(page.read_text()))]


def test_readme_and_docs_have_run_commands():
    assert len(run_commands((ROOT / "README.md").read_text())) >= 3
    assert len(run_commands((ROOT / "docs" / "generators.md").read_text())) >= 3  # the docs are read too
    assert run_commands("text\n  a2v-run -m a=1,2 'b=x y'  # comment\n`a2v-run c=1` in prose") == [["a=1,2", "b=x y"]]


@pytest.mark.parametrize("overrides", readme_overrides())
def test_every_readme_and_docs_command_composes(overrides, make_cfg):
    expanded = []
    for o in overrides:  # a sweep "k=a,b" composes as each of its values
        key, _, values = o.partition("=")
        expanded.append([f"{key}={v}" for v in values.split(",")] if "," in values and "[" not in values else [o])
    sweep = max(map(len, expanded), default=1)  # a plain command composes once, a sweep once per value
    for combo in zip(*[e if len(e) > 1 else e * sweep for e in expanded]):
        cfg = make_cfg(*combo, "data.root=/data/ESC-50")
        C.validate(cfg)


def test_the_configuration_page_is_generated_from_the_schema_and_conf():
    """docs/configuration.md's key tables are what schema.py and conf/ say today, and every key has a meaning."""
    from a2v_flower import docs_config

    page = docs_config.PAGE.read_text()
    fresh = docs_config.generate()
    assert docs_config.page_with(fresh, page) == page, (
        "docs/configuration.md disagrees with a2v_flower/schema.py or conf/: run "
        "`.venv/bin/python -m a2v_flower.docs_config --write` and commit the page")
    stale = page.replace("| `seed` | `0` |", "| `seed` | `1` |")
    assert stale != page and docs_config.page_with(fresh, stale) == page  # the check above can fail
    rows = [line for line in fresh.splitlines() if line.startswith("| `") and "=<option>" not in line]
    assert len(rows) > 100 and [r for r in rows if r.endswith("|  |")] == []  # a comment beside every key in conf/


@pytest.mark.parametrize("override,match", [
    ("strategy.aggregation=median", r"strategy.aggregation='median' is not allowed; expected one of \['avg'"),
    ("train.lr=-1", r"train.lr=-1(\.0)? is not allowed; expected a number > 0"),
    ("train.loss=hinge", r"train.loss='hinge' is not allowed; expected one of \['mse', 'contrastive'"),
    ("train.absent_scale=2", r"train.absent_scale=2(\.0)? is not allowed with train.loss='mse\+contrastive'"),
    ("train.absent_scale=0.5 train.loss=mse", r"train.absent_scale=0.5 is not allowed with train.loss='mse'"),
    ("train.temperature=0", r"train.temperature=0(\.0)? is not allowed; expected a number > 0"),
    ("federation.num_cpus=0", r"federation.num_cpus=0"),
    ("adapter.heads=3", r"adapter.width=64 must be divisible by adapter.heads=3"),
    ("prompt_template=hello", r"must contain '\{\}'"),
    ("data.splits.train=0.9", r"data.splits=.* summing to 1"),
    ("wandb.mode=maybe", r"wandb.mode='maybe'"),
    ("diffusion.clip_seq_len=64", r"diffusion.clip_seq_len=64 is not allowed; expected one of \[77\]"),
    ("generator=vae", r"generator.type='vae' is unconditioned, so granularity='unified' cannot"),
    ("strategy=kd", r"strategy.aggregation='kd' distils on generator samples but generator.type='none'"),
    ("replay.refine_epochs=3", r"replay.refine_epochs needs generator samples"),
    ("replay.synthetic_samples_per_class=4", r"replay.synthetic_samples_per_class sends the sites' generator samples"),
    ("server_generator.epochs=5", r"server_generator.epochs=5 but nothing uses its samples; set strategy=kd"),
])
def test_bad_values_are_named(override, match, make_cfg):
    with pytest.raises(ValueError, match=match):
        C.validate(make_cfg(*override.split()))


def test_esc50_without_root_is_clear(make_cfg, monkeypatch):
    monkeypatch.delenv("ESC50_ROOT", raising=False)
    with pytest.raises(ValueError, match="data.root is required"):
        C.validate(make_cfg("data=esc50"))


def test_gpu_request_without_gpu_is_clear():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="federation.num_gpus=0.25 but this machine has no CUDA GPU"):
        C.check_gpus(0.25)


def test_load_config_from_flower_run_config(tmp_path, make_cfg):
    cfg = make_cfg("num_rounds=4")
    OmegaConf.save(cfg, tmp_path / "c.yaml")
    assert C.load_config({"config-file": str(tmp_path / "c.yaml")}).num_rounds == 4
    assert C.load_config({"config-file": "", "overrides": "num_rounds=9 strategy=uniform"}).strategy.aggregation \
        == "uniform"
    with pytest.raises(FileNotFoundError, match="config-file='/nope.yaml'"):
        C.load_config({"config-file": "/nope.yaml"})


def test_generator_groups_are_checked_against_classes(make_cfg):
    cfg = make_cfg("generator=cvae", "granularity=per_group", "granularity.groups={a: [dog, rain], b: [dog]}")
    with pytest.raises(ValueError, match="'dog' is in granularity.groups.a and granularity.groups.b"):
        C.replay_spec(cfg, ["dog", "rain"])
    spec = C.replay_spec(make_cfg("generator=gan", "granularity=per_group"), ["dog", "rain", "siren"])
    assert spec.groups == {"animals": ["dog"], "natural": ["rain"], "urban": ["siren"]}  # ESC-50 groups


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", r"train.lrr: Key 'lrr' not in 'Train'"),
    ("+train.foo=1", r"train.foo: Key 'foo' not in 'Train'"),
    ("train.lr=fast", r"train.lr: Value 'fast' .* could not be converted to Float"),
    ("federation.num_cpus=1.5", r"federation.num_cpus: .* could not be converted to Integer"),
    ("data.splits={train: 0.5, val: 0.3, tst: 0.2}", r"data.splits.tst: Key 'tst' not in 'Splits'"),
    ("data=nope", r"Could not find 'data/nope'; Available options in 'data': esc50, hf, synthetic"),
])
def test_schema_refuses_unknown_keys_and_wrong_types_at_compose_time(override, match, make_cfg):
    with pytest.raises(ValueError, match=match):
        C.validate(make_cfg(override))


def test_a_config_file_is_checked_against_the_schema(tmp_path, make_cfg):
    cfg = OmegaConf.to_container(make_cfg())
    cfg["train"]["lrr"] = 1e-3                                          # a misspelt key in a hand-edited file
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="train.lrr: Key 'lrr' not in 'Train'"):
        C.validate(C.load_config({"config-file": str(tmp_path / "c.yaml")}))


def test_flower_run_config_keys_map_onto_hydra(tmp_path, make_cfg):
    import tomli  # flwr depends on it (tomllib needs Python 3.11)

    flower = tomli.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(C.FLOWER_KEYS) | {"overrides", "config-file", "launch-id"} == set(flower)  # flwr refuses keys absent there
    defaults = C.load_config(flower)  # pyproject's defaults (0) keep the Hydra values
    assert (defaults.num_rounds, defaults.train.local_epochs, defaults.train.lr) == (8, 8, 3e-3)
    given = flower | {"num-server-rounds": 3, "local-epochs": 2, "lr": 0.01, "batch-size": 4, "fraction-train": 0.5,
                      "fraction-evaluate": 0.25, "overrides": "strategy=uniform train.local_epochs=5"}
    cfg = C.load_config(given)
    assert (cfg.num_rounds, cfg.train.local_epochs, cfg.train.lr, cfg.train.batch_size) == (3, 2, 0.01, 4)
    assert (cfg.strategy.fraction_train, cfg.strategy.fraction_evaluate, cfg.strategy.aggregation) == (0.5, 0.25,
                                                                                                       "uniform")
    OmegaConf.save(make_cfg("num_rounds=5"), tmp_path / "c.yaml")  # a2v-run's resolved file, plus a Flower key
    assert C.load_config(flower | {"config-file": str(tmp_path / "c.yaml"), "local-epochs": 7}).train.local_epochs == 7
    with pytest.raises(ValueError, match=r"run config lr=-1.0 is not allowed; expected a number >= 0 \(0 keeps train.lr"):
        C.load_config(flower | {"lr": -1.0})
