"""Where models run: a device setting (auto | cpu | cuda | cuda:N) -> torch.device. The one module that asks torch
whether there is a GPU (a source test holds every other module to that).

`auto` is the GPU this process was handed, else the CPU. Ray hands a simulated site's actor its GPU (or GPU
share) by setting CUDA_VISIBLE_DEVICES, so inside the actor it is `cuda:0`; an actor with federation.num_gpus=0
sees no GPU at all. The ServerApp runs in Ray's driver, which Ray does not account for: it sees every GPU.
"""

from __future__ import annotations

import math
import struct

import torch

from a2v_flower.rules import device_setting as check_setting  # torch-free: the schema runs it too


def cuda_count() -> int:
    """GPUs this process sees (0 without CUDA, or when Ray hid them from a num_gpus=0 actor)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(setting: str, key: str = "device") -> torch.device:
    """The torch.device of `setting`; a CUDA device this process does not have is a ValueError naming `key`."""
    check_setting(key, setting)
    if setting == "auto":
        return torch.device("cuda:0" if cuda_count() else "cpu")
    device = torch.device("cuda:0" if setting == "cuda" else setting)
    if device.type == "cuda" and device.index >= cuda_count():
        raise ValueError(f"{key}={setting!r} but this process sees {cuda_count()} CUDA GPU(s); "
                         f"use {key}=auto or cpu, or a cuda:N with N < {cuda_count()}" if cuda_count() else
                         f"{key}={setting!r} but this process sees no CUDA GPU; use {key}=auto or cpu")
    return device


def site_device_class(setting: str, num_gpus: float) -> str:
    """"cuda" or "cpu": where a simulated site's models will run, judged from the launching process. A site's
    actor sees ceil(num_gpus) of the GPUs (one for a fraction), none with num_gpus=0; a refusal names the keys."""
    check_setting("device.site", setting)
    visible = min(math.ceil(num_gpus), cuda_count())
    if setting == "auto":
        return "cuda" if visible else "cpu"
    index = 0 if setting in ("cpu", "cuda") else int(setting.split(":")[1])
    if setting != "cpu" and index >= visible:
        why = ("federation.num_gpus=0: Ray hides every GPU from such an actor" if not num_gpus else
               f"a site's actor sees {visible} GPU(s) (federation.num_gpus={num_gpus}, {cuda_count()} on this machine)")
        raise ValueError(f"device.site={setting!r} is not allowed with {why}; use device.site=auto or cpu")
    return "cpu" if setting == "cpu" else "cuda"


def actors_per_gpu(num_gpus: float) -> int:
    """Sites Flower's actor pool puts on one GPU for a fraction: int(1 / num_gpus), num_gpus as the simulation
    receives it, a 32-bit protobuf float (0.2 arrives as 0.2000000030: 4 sites, not 5)."""
    return int(1 / struct.unpack("f", struct.pack("f", num_gpus))[0])


def check_placement(device_class: str, audio_dtype: str | None = None, diffusion_dtype: str | None = None,
                    cpu_offload: bool = False, who: str = "device") -> None:
    """Refuse what cannot work on a CPU: a float16/bfloat16 AST or pipeline, and diffusion.cpu_offload."""
    if device_class == "cuda":
        return
    for key, dtype in (("model.audio.dtype", audio_dtype), ("diffusion.dtype", diffusion_dtype)):
        if dtype not in (None, "float32"):
            raise ValueError(f"{key}={dtype!r} is not allowed on a CPU ({who} runs there); expected float32, or a "
                             "CUDA GPU for float16/bfloat16")
    if cpu_offload:
        raise ValueError(f"diffusion.cpu_offload=true needs a CUDA GPU but {who} runs on the CPU; "
                         "use diffusion.cpu_offload=false")


def empty_cache(device: torch.device | str) -> None:
    """Return a CUDA device's cached blocks to the driver (after a pipeline is dropped); nothing on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(device: torch.device | str) -> int:
    """Bytes of the most GPU memory torch held on `device` since the last reset (0 on a CPU)."""
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else 0


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak for `peak_memory` (nothing on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for a CUDA device's queued work (timings); nothing on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device ("NVIDIA H100 80GB HBM3"), else "cpu"."""
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
