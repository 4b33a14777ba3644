"""Import BasicSR / Real-ESRGAN (their architectures: RRDBNet, SRVGGNetCompact) on current torchvision.

basicsr 1.4.2 (the last release) imports `torchvision.transforms.functional_tensor`, which torchvision 0.17
removed; since `basicsr/__init__` imports its data package, every basicsr and realesrgan import fails. The fix
is upstream but unreleased, so register the one function it needs under the old module name first.
"""

from __future__ import annotations

import sys
import types


def install_functional_tensor_shim() -> None:
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    from torchvision.transforms import functional

    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim


def rrdbnet_class():
    install_functional_tensor_shim()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet


def srvgg_class():
    install_functional_tensor_shim()
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return SRVGGNetCompact
