"""Device profiles for the roofline latency model: peak FLOP/s and memory bandwidth.

Every figure is float32 (the precision the models here run in and that their
traffic is measured for), at the vendor's boost/maximum clock, from the
source named in the profile.  Peaks are what the hardware could do, not what
a framework reaches: the roofline with efficiency 1 is a lower bound on
compute time.  ``host`` is this machine, measured by
``python -m infer.lab.profile_host`` (matmul FLOP/s and copy bandwidth actually
reached), read from ``results/host_profile.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os

HOST_FILE = os.path.join("results", "host_profile.json")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
  name: str
  description: str
  peak_flops: float  # float32 FLOP/s
  mem_bandwidth: float  # bytes/s
  source: str
  precision: str = "fp32"


PROFILES = {p.name: p for p in [
    DeviceProfile(
        "gtx1660ti", "NVIDIA GeForce GTX 1660 Ti (Turing TU116), ASTRA's device",
        peak_flops=2 * 1536 * 1.770e9,  # 5.44 TFLOP/s: 1536 CUDA cores x 1770 MHz boost x FMA
        mem_bandwidth=288e9,  # 12 Gbit/s GDDR6 x 192-bit bus / 8
        source="NVIDIA GeForce GTX 1660 Ti specifications (nvidia.com/en-us/geforce/"
               "graphics-cards/gtx-1660-ti/): 1536 CUDA cores, 1770 MHz boost, 6 GB GDDR6 "
               "at 12 Gbps on a 192-bit interface; FP32 peak = 2 x cores x boost clock"),
    DeviceProfile(
        "orin-nano", "NVIDIA Jetson Orin Nano 8GB (Ampere GPU, 15 W mode)",
        peak_flops=2 * 1024 * 625e6,  # 1.28 TFLOP/s
        mem_bandwidth=68e9,
        source="NVIDIA Jetson Orin Nano Series Data Sheet (DS-11105-001): 8GB module, "
               "1024 CUDA cores, GPU maximum operating frequency 625 MHz, 128-bit LPDDR5 "
               "68 GB/s; FP32 peak = 2 x cores x clock. (JetPack 6.1 'Super' mode raises "
               "these to 1020 MHz and 102 GB/s.)"),
    DeviceProfile(
        "rpi5", "Raspberry Pi 5 (BCM2712, 4x Arm Cortex-A76 at 2.4 GHz), CPU",
        peak_flops=4 * 2.4e9 * 16,  # 153.6 GFLOP/s: 2 x 128-bit NEON FMA pipes per core
        mem_bandwidth=4267e6 * 4,  # 17.1 GB/s: LPDDR4X-4267 on a 32-bit bus
        source="Raspberry Pi 5 product brief (raspberrypi.com): quad-core Cortex-A76 at "
               "2.4 GHz, LPDDR4X-4267 SDRAM; Arm Cortex-A76 Software Optimization Guide: "
               "two 128-bit FP/ASIMD pipes with fused multiply-add = 16 FP32 FLOP/cycle/core"),
    DeviceProfile(
        "h100", "NVIDIA H100 SXM5 80GB",
        peak_flops=67e12,  # FP32 on CUDA cores (TF32 tensor cores: 494.7 TFLOP/s dense)
        mem_bandwidth=3.35e12,
        source="NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/), "
               "H100 SXM column: FP32 67 TFLOPS, GPU memory bandwidth 3.35 TB/s"),
]}


def names() -> list[str]:
  return sorted([*PROFILES, "host"])


def load_host(path: str = HOST_FILE) -> DeviceProfile:
  """The ``host`` profile measured by ``python -m infer.lab.profile_host``."""
  if not os.path.exists(path):
    raise ValueError(f"no host profile at {path}; measure this machine first: "
                     f"python -m infer.lab.profile_host --out {path}")
  try:
    with open(path) as f:
      d = json.load(f)
    return DeviceProfile("host", d["description"], float(d["peak_flops"]),
                         float(d["mem_bandwidth"]), d["source"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    raise ValueError(f"{path} is not a host profile; rewrite it with "
                     f"python -m infer.lab.profile_host --out {path}") from None


def get(name: str, host_file: str = HOST_FILE) -> DeviceProfile:
  """A profile by name ('host' reads ``host_file``); ValueError naming the choices."""
  if name == "host":
    return load_host(host_file)
  if name not in PROFILES:
    raise ValueError(f"unknown device profile {name!r}; choose from {names()}")
  return PROFILES[name]
