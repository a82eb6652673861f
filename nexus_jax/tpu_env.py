"""Keep libtpu quiet on hosts without TPU chips (CPU/GPU machines with the ``tpu`` extra installed).

JAX's first backend probe loads libtpu when it is installed; on a machine that is not a TPU VM libtpu finds no
metadata and prints a block of ``Failed to find host bounds ... INVALID_ARGUMENT: unexpected worker hostname``
errors on stderr. :func:`quiet_libtpu_without_tpu` gives it the planner's defaults (``launch.topology``) first.
"""

from __future__ import annotations

import glob
import importlib.util
import os

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips, but also e.g. the gVNIC network card of any GCE VM


def _google_pci_devices() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def tpu_chips_visible() -> bool:
    """True when this host has TPU chips on its PCI bus, or when that cannot be told."""
    if not _google_pci_devices():
        return False
    try:  # a Google device: ask JAX, which knows the TPU device ids
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private API moved: assume a TPU host and leave libtpu's environment alone
        return True


def quiet_libtpu_without_tpu() -> bool:
    """Apply the planner's libtpu defaults (``os.environ.setdefault`` only) when libtpu is installed and this host
    has no TPU chip; never on a TPU host, where libtpu needs its real metadata. Must run before JAX initialises its
    backends. ``NEXUS_JAX_LIBTPU_ENV=keep`` turns it off. Returns whether the defaults were applied."""
    if os.environ.get("NEXUS_JAX_LIBTPU_ENV") == "keep" or importlib.util.find_spec("libtpu") is None:
        return False
    if tpu_chips_visible():
        return False
    from launch.topology import _quiet_libtpu_env

    _quiet_libtpu_env()
    return True
