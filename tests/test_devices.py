"""Where models run: device settings resolve in one module, every heavy model of a site, of the server
and of a2v-generate follows them, and what cannot work on a CPU is refused before anything starts.

No GPU here: the `gpu` fixture makes this machine claim one. `devices` reports a CUDA GPU, and every Module.to /
Tensor.to aimed at CUDA lands on the CPU and is recorded, so a test sees what would have gone to the GPU."""

from __future__ import annotations

import dataclasses
import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from a2v_flower import client_app, devices
from a2v_flower import config as C
from a2v_flower.cache import model_identity, sha1_of
from a2v_flower.rendering.pipelines import Renderer
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.audio_encoder import AudioEncoder
from a2v_flower.models.generators import build_generator, generator_keys, train_generator
from a2v_flower.rendering.rounds import RoundRenderer
from a2v_flower.server_generators import ServerGenerators
from tests.test_apps import context, message, setup
from tests.test_faults import refuse
from tests.test_server_generator import TARGETS, site_stats, toy

PACKAGE = Path(__file__).resolve().parents[1] / "a2v_flower"
TINY_AST = (("hidden_size", 32), ("intermediate_size", 64), ("num_attention_heads", 2), ("num_hidden_layers", 1))


class Placement:
    """While active: every module that ran forward, with the devices of its parameters, buffers and outputs; with
    `gpu`, every move aimed at CUDA (Module.to: the module; Tensor.to: "tensor"), made on the CPU instead."""

    def __init__(self, monkeypatch, gpu: bool):
        self.ran, self.devices, self.moved = {}, set(), []  # id -> module; device types seen; moved to "cuda"
        if gpu:
            monkeypatch.setattr(devices, "cuda_count", lambda: 1)
            monkeypatch.setattr(devices, "empty_cache", lambda device: None)
            for cls, what in ((torch.nn.Module, None), (torch.Tensor, "tensor")):
                monkeypatch.setattr(cls, "to", self._spy(cls.to, what))
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _spy(self, real, what):
        def to(obj, *args, **kwargs):
            def swap(a):
                if isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda":
                    self.moved.append(what or obj)
                    return torch.device("cpu")
                return a
            return real(obj, *map(swap, args), **{k: swap(v) for k, v in kwargs.items()})
        return to

    def _hook(self, module, args, output):
        self.ran[id(module)] = module
        outs = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False),
                   *(o for o in outs if isinstance(o, torch.Tensor)), *getattr(output, "__dict__", {}).values()]
        self.devices |= {t.device.type for t in tensors if isinstance(t, torch.Tensor)}

    def names(self) -> set[str]:
        """Class names of the modules sent to CUDA."""
        return {type(m).__name__ for m in self.moved if isinstance(m, torch.nn.Module)}

    def strays(self) -> list[str]:
        """Modules holding tensors that ran forward but were never sent to CUDA, themselves or inside a module that
        was (stateless ones made on the fly, such as AST's padding, hold nothing to place)."""
        inside = {id(sub) for m in self.moved if isinstance(m, torch.nn.Module) for sub in m.modules()}
        return sorted({type(m).__name__ for i, m in self.ran.items() if i not in inside
                       and [*m.parameters(recurse=False), *m.buffers(recurse=False)]})


@pytest.fixture
def gpu(monkeypatch):
    """This machine claims one CUDA GPU (see Placement)."""
    placement = Placement(monkeypatch, gpu=True)
    yield placement
    placement.handle.remove()


@pytest.fixture
def cpu(monkeypatch):
    """Placement records on the plain CPU machine."""
    placement = Placement(monkeypatch, gpu=False)
    yield placement
    placement.handle.remove()


# ---- the resolver ---------------------------------------------------------------------------------------------

def test_settings_resolve_on_a_machine_without_gpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    assert devices.resolve("auto") == devices.resolve("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device.site='cuda' but this process sees no CUDA GPU; use device.site="):
        devices.resolve("cuda", "device.site")
    with pytest.raises(ValueError, match=r"device.server='gpu' is not allowed; expected one of auto \| cpu \| cuda"):
        devices.resolve("gpu", "device.server")


def test_auto_is_the_gpu_this_process_was_handed(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)  # Ray's driver sees both; an actor sees its own as cuda:0
    assert devices.resolve("auto") == devices.resolve("cuda") == torch.device("cuda:0")
    assert devices.resolve("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"device.server='cuda:2' but this process sees 2 CUDA GPU\(s\)"):
        devices.resolve("cuda:2", "device.server")


def test_a_sites_device_follows_what_ray_shows_its_actor(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 1)
    assert devices.site_device_class("auto", 0.25) == "cuda" and devices.site_device_class("auto", 0) == "cpu"
    assert devices.site_device_class("cpu", 0.5) == "cpu" and devices.site_device_class("cuda:0", 0.5) == "cuda"
    with pytest.raises(ValueError, match=r"device.site='cuda' is not allowed with federation.num_gpus=0: Ray hides"):
        devices.site_device_class("cuda", 0)
    with pytest.raises(ValueError, match=r"device.site='cuda:1' is not allowed with a site's actor sees 1 GPU"):
        devices.site_device_class("cuda:1", 0.25)


def test_an_odd_gpu_fraction_is_run_with_a_warning(make_cfg, monkeypatch, caplog):
    from a2v_flower import config as C
    from benchmarks.bench_gpu import actors_per_gpu

    assert {str(f): devices.actors_per_gpu(f) for f in (0.5, 0.33, 0.25, 0.2, 0.125, 0.1)} == actors_per_gpu()
    monkeypatch.setattr(devices, "cuda_count", lambda: 1)
    C.check_devices(make_cfg("federation.num_gpus=0.25"))
    assert not caplog.records
    C.check_devices(make_cfg("federation.num_gpus=0.2"))
    assert "federation.num_gpus=0.2 puts 4 sites on a GPU, not 5" in caplog.text


def cuda_queries(source: str) -> list[str]:
    """Every use of torch.cuda in `source`: `<x>.cuda.<attr>` chains and imports of torch.cuda or its names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda":
            found.append(ast.unparse(node))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.cuda"):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "cuda" for a in node.names):
            found.append("from torch import cuda")
    return found


def test_only_the_resolver_asks_torch_about_gpus():
    planted = "import torch\nfrom torch import cuda\nok = torch.cuda.is_available() or torch.cuda.device_count()\n"
    assert cuda_queries(planted) == ["from torch import cuda", "torch.cuda.is_available", "torch.cuda.device_count"]
    users = {str(p.relative_to(PACKAGE)): q for p in sorted(PACKAGE.rglob("*.py"))
             if (q := cuda_queries(p.read_text()))}
    assert set(users) == {"devices.py"}, users
    assert "torch.cuda.is_available" in users["devices.py"]


# ---- refused before anything starts: one line, exit 2 -----------------------------------------------------------

@pytest.fixture(scope="module")
def base(cache_dir, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("devices") / "outputs"
    return ["data.clips_per_class=4", "num_rounds=1", f"paths.cache_dir={cache_dir}", f"paths.output_root={out}"]


REFUSED = [  # on this machine: no CUDA GPU
    (["model.audio.dtype=bfloat16"], r"model.audio.dtype='bfloat16' is not allowed on a CPU \(a site \(device.site="),
    (["model.audio.dtype=float8"], r"model.audio.dtype='float8' is not allowed; expected one of \['float32'"),
    (["diffusion.dtype=float16"], r"diffusion.dtype='float16' is not allowed on a CPU \(the server \(device.server="),
    (["diffusion.cpu_offload=true"], r"diffusion.cpu_offload=true needs a CUDA GPU but the server .* runs on the CPU"),
    (["device.site=cuda:1"], r"device.site='cuda:1' is not allowed with federation.num_gpus=0(\.0)?: Ray hides"),
    (["device.server=cuda:3"], r"device.server='cuda:3' but this process sees no CUDA GPU"),
    (["device.site=gpu"], r"device.site='gpu' is not allowed; expected one of auto \| cpu \| cuda \| cuda:N"),
    (["federation.num_gpus=0.25"], r"federation.num_gpus=0.25 but this machine has no CUDA GPU"),
]


@pytest.mark.parametrize("overrides,match", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_what_cannot_run_here_is_refused_in_one_line(overrides, match, base, capsys, monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)  # also where the suite runs on a GPU machine
    out = Path(base[-1].split("=", 1)[1])
    line = refuse([*base, *overrides], capsys)
    assert re.search(match, line), line
    assert not out.exists() or not any(out.iterdir())


def test_the_default_run_stays_on_the_cpu_here(make_cfg, monkeypatch):
    from a2v_flower import config as C

    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    cfg = make_cfg()
    C.check_devices(cfg)  # nothing refused
    assert C.site_device(cfg) == C.server_device(cfg) == torch.device("cpu")
    assert (cfg.device.site, cfg.device.server, cfg.model.audio.dtype) == ("auto", "auto", "float32")


# ---- placement: the encoder --------------------------------------------------------------------------------------

def waves(n=3):
    return [np.random.default_rng(i).normal(0, 0.1, 16000).astype(np.float32) for i in range(n)]


def test_encoder_runs_on_its_device_and_caches_float32_cpu_tokens(gpu):
    spec = C.spec("model.audio", max_length=128, tokens=4, batch_size=2, tiny=TINY_AST)
    enc = AudioEncoder(spec, "cuda")
    out = enc.encode(waves())
    assert gpu.names() == {"ASTModel"} and gpu.moved.count("tensor") == 2  # the model once, each batch's input
    assert gpu.strays() == []
    assert out.shape == (3, 4, 32) and out.dtype == torch.float32 and out.device.type == "cpu"


def test_encoder_dtype_and_device_class_are_in_its_cache_identity(cpu):
    spec = C.spec("model.audio", max_length=128, tokens=4, tiny=TINY_AST)
    legacy = sha1_of(model_identity(None, {"tiny": spec.tiny, "seed": 0}), 128, 4, 16000, "pool: sound columns")
    ids = {(d, t): AudioEncoder(C.spec("model.audio", **{**spec.__dict__, "dtype": t}), d).identity
           for d in ("cpu", "cuda", "cuda:1") for t in ("float32", "bfloat16")}
    assert ids["cpu", "float32"] == legacy  # embeddings cached before devices existed stay valid
    assert len(set(ids.values())) == 4 and ids["cuda", "float32"] == ids["cuda:1", "float32"]  # the class, not N
    enc = AudioEncoder(C.spec("model.audio", **{**spec.__dict__, "dtype": "bfloat16"}), "cpu")
    out = enc.encode(waves(2))  # bfloat16 works on a CPU too (the config refuses it as too slow to be meant)
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16} and out.dtype == torch.float32
    assert enc.model.config._attn_implementation == "sdpa" and cpu.devices == {"cpu"}


# ---- placement: a site's handlers --------------------------------------------------------------------------------

SITE = ("generator=cvae", "generator.epochs=2", "generator.hidden=32", "train.local_epochs=1")


@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_site_handlers_put_every_model_on_the_site_device(where, make_cfg, task_identity, monkeypatch, request,
                                                         tmp_path):
    monkeypatch.setattr(client_app, "_SITES", {})  # embedded afresh (a cache of its own): the encoder runs too
    monkeypatch.setattr(client_app, "_ENCODERS", {})
    cfg = make_cfg(*SITE, f"device.site={'cuda' if where == 'gpu' else 'cpu'}", f"paths.cache_dir={tmp_path}/cache")
    _, targets, adapters = setup(cfg)  # what the server sends (its text encoders run before the site's handlers)
    placement = request.getfixturevalue(where)
    node = context()
    reply = client_app.train(message(cfg, adapters, targets), node)
    assert reply.content["metrics"]["gen_classes_measured"] > 0  # generators trained and sampled
    client_app.evaluate(message(cfg, adapters, targets, kind="evaluate", with_targets=False), node)
    assert {"AdapterSet", "ASTModel", "Sequential"} <= {type(m).__name__ for m in placement.ran.values()}
    if where == "gpu":
        assert {"AdapterSet", "ASTModel", "CVAEGenerator"} <= placement.names() and placement.strays() == []
    assert placement.devices == {"cpu"}  # and what travels: on the CPU (the reply's arrays are numpy)


# ---- placement: the server's kd, refinement, generators and class targets ---------------------------------------

@pytest.mark.parametrize("diffusion", ["sd", "flux"])
def test_class_targets_are_made_on_the_server_device(diffusion, gpu, tmp_path):
    from a2v_flower.cache import TensorCache
    from a2v_flower.models.text_encoders import class_targets

    targets = class_targets(["dog", "rain"], "a photo of a {}", diffusion, C.spec("model.text"), 16,
                            TensorCache(tmp_path), device="cuda")
    want = {"CLIPTextModel"} | ({"T5EncoderModel"} if diffusion == "flux" else set())
    assert gpu.names() == want and gpu.strays() == []
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in targets.values())  # cached, sent


def server_generators(device) -> tuple[ServerGenerators, dict]:
    """Two sites' statistics and cvae generators, a server generator, kd and refinement: (server, teachers)."""
    spec = C.spec("generator", type="cvae", hidden=16, epochs=1)
    conf = C.defaults("generator=cvae")
    replay = dataclasses.replace(C.replay_spec(conf, ["a", "b", "c"]), generator=spec)
    sg = C.spec("server_generator", epochs=2, hidden=16)
    server = ServerGenerators(classes=["a", "b", "c"], class_targets=TARGETS, token_shape=(4, 8),
                              make_adapters=lambda: build_adapters(8, TARGETS, 16, 2, 0),
                              train_spec=C.spec("train", local_epochs=1, batch_size=8),
                              options=C.spec("replay", samples_per_class=4, refine_epochs=1, kd_epochs=1), seed=0,
                              replay=replay, server_gen=sg, kd=True, device=device)
    key, teachers = next(iter(generator_keys("unified", ["a", "b", "c"], None))), {}
    for site, classes in enumerate(([0, 1], [2])):
        x, y = toy(classes, n=6, seed=site)
        teachers[site] = build_adapters(8, TARGETS, 16, 2, site).state_dict()
        server.class_stats[site] = site_stats(x, y, build_adapters(8, TARGETS, 16, 2, site)) | {
            "seen": torch.bincount(y, minlength=3).clamp(max=1).float()}
        gen = build_generator(spec, (4, 8))
        train_generator(gen, x, y, TARGETS, spec)
        server.generators[site] = {key: gen.state_tensors()}
    return server, teachers


@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_server_training_runs_on_the_server_device(where, request):
    placement = request.getfixturevalue(where)
    server, teachers = server_generators("cuda" if where == "gpu" else "cpu")
    glob = build_adapters(8, TARGETS, 16, 2, 0)
    placement.ran.clear()
    arrays, out = server.server_training(1, ArrayRecord(glob.state_dict()), teachers)
    assert min(out[f"server/{k}"] for k in ("kd_loss", "adapter_finetuning_loss", "generator_loss")) >= 0
    assert {"AdapterSet", "StatsGenerator", "Sequential"} <= {type(m).__name__ for m in placement.ran.values()}
    if where == "gpu":
        assert {"AdapterSet", "StatsGenerator", "CVAEGenerator"} <= placement.names() and placement.strays() == []
    assert all(v.device.type == "cpu" for v in server.state_tensors().values())  # server checkpoints: CPU
    assert set(arrays.to_torch_state_dict()) == set(glob.state_dict())


# ---- placement: renders, the judge and a2v-generate ------------------------------------------------------------

def test_render_rounds_use_the_server_device_and_keep_one_judge(gpu, tmp_path, monkeypatch):
    from a2v_flower.rendering.judge import ImageJudge

    built = []
    real = ImageJudge.tiny.__func__
    monkeypatch.setattr(ImageJudge, "tiny",
                        classmethod(lambda cls, **kw: built.append(kw) or real(cls, **kw)))
    classes, targets = ["dog", "rain"], {"clip": torch.randn(2, 77, 768)}
    rr = RoundRenderer(Renderer(C.spec("diffusion"), "cuda"), every=1, out_dir=tmp_path, classes=classes,
                       targets=targets, judge_id=None, device="cuda")
    stats = {0: {"counts": torch.tensor([1.0, 1.0]), "audio_mean/0": torch.randn(4, 16),
                 "audio_mean/1": torch.randn(4, 16)}}
    for rnd in (1, 2):
        rr(rnd, build_adapters(16, targets, 32, 2, 0), stats, last_round=2)
    assert len(built) == 1 and built[0]["device"] == torch.device("cuda")  # one judge, kept across rounds
    assert {"AdapterSet", "CLIPModel", "UNet2DConditionModel", "AutoencoderKL"} <= gpu.names()
    assert gpu.strays() == []


def test_a2v_generate_puts_encoder_adapters_and_pipeline_on_one_device(gpu, tmp_path_factory, cache_dir):
    from a2v_flower.pipeline import A2VPipeline
    from tests.test_pipeline import tiny_run

    run = tiny_run(tmp_path_factory.mktemp("gen"), cache_dir)
    gpu.moved.clear(), gpu.ran.clear()
    pipe = A2VPipeline.from_run(run, ["device.server=cuda"])
    result = pipe(audio=waves(2))
    assert len(result.images) == 2 and pipe.device == torch.device("cpu")  # the spy's stand-in for cuda:0
    assert {"AdapterSet", "ASTModel", "UNet2DConditionModel", "AutoencoderKL"} <= gpu.names()
    assert gpu.strays() == []
    with pytest.raises(ValueError, match=r"diffusion.dtype='float16' is not allowed on a CPU \(a2v-generate"):
        A2VPipeline.from_run(run, ["device.server=cpu", "diffusion.dtype=float16"])


# ---- docs/gpu.md ----------------------------------------------------------------------------------------------

def gpu_doc_commands() -> list[list[str]]:
    """The overrides of every `a2v-run` line of docs/gpu.md's command block."""
    text = (PACKAGE.parent / "docs" / "gpu.md").read_text()
    return [line.split("#")[0].split()[1:] for line in re.findall(r"^\.venv/bin/a2v-run.*$", text, flags=re.M)]


@pytest.mark.parametrize("overrides", gpu_doc_commands())
def test_every_gpu_doc_command_composes(overrides, make_cfg, monkeypatch):
    from a2v_flower import config as C

    cfg = make_cfg(*overrides)
    C.validate(cfg)
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)  # the machine the page is about
    C.check_devices(cfg)


def test_gpu_doc_has_its_commands_and_the_actor_table():
    from benchmarks.bench_gpu import actors_per_gpu

    assert len(gpu_doc_commands()) == 4
    text = (PACKAGE.parent / "docs" / "gpu.md").read_text()
    for fraction, actors in actors_per_gpu().items():  # the page's table is what Flower's formula gives
        assert re.search(rf"^\| {re.escape(fraction)} \| (\*\*)?{actors}\b", text, flags=re.M), fraction
