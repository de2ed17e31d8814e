"""Input pipeline: the data config, the loader's path (loading/), the batch ops on the device
(augment/) and the offline tools (python -m fastdeit.data.<tool>).

The names below are imported on first use (PEP 562), not with the package: a tool run as
`python -m fastdeit.data.verify` (or synthetic, pack) then starts without torch and DALI, which
the loader needs and the tools do not (1.5 s of every such start on a 2-core machine).
"""
import importlib

_EXPORTS = {
    "DataConfig": ".config",
    "Loader": ".loading.loader",
    "TrainLoader": ".loading.loader",
    "ValLoader": ".loading.loader",
    "build_loader": ".loading.loader",
    "scan_image_folder": ".loading.folder",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
