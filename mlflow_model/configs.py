"""Configs by name (the ones mmdet ships for a family of ours, ``scoring.families``) or by path,
and their published checkpoints."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from scoring.errors import MmdetMlflowError
from scoring.families import FAMILIES, family_of_config

COCO_CONFIG_NAME_SUFFIX = "_coco"


class ConfigError(MmdetMlflowError, ValueError):
    """A config that is not of a model family we can package."""


def mmdet_config_dir() -> Path:
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or one of mmdet's shipped config names (``.py`` optional)."""
    path = Path(name_or_path)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    name = path.name.removesuffix(".py")
    for family in FAMILIES.values():
        shipped = mmdet_config_dir() / family.config_folder / f"{name}.py"
        if shipped.is_file():
            return shipped
    known = "; ".join(f"{f.title} configs: {', '.join(f.shipped_configs)}" for f in FAMILIES.values())
    raise ConfigError(f"no config file {str(name_or_path)!r} and no config of that name ships with "
                      f"mmdet; {known}")


def config_name(name_or_path: str | Path) -> str:
    return Path(str(name_or_path)).name.removesuffix(".py")


def load_config(name_or_path, num_classes: int | None = None):
    """The mmengine Config, made self-contained for packaging: no pretrained-backbone download
    at model build time, and the head sized for ``num_classes`` when given. Refused unless its
    model is of a family we know (``scoring.families``)."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(resolve_config_path(name_or_path)))
    if family_of_config(cfg.model) is None:
        families = ", ".join(f.title for f in FAMILIES.values())
        raise ConfigError(f"{name_or_path} is not a config of a model family we package ({families}): "
                          f"its head is {cfg.model.get('bbox_head', {}).get('type')!r}")
    cfg.model.backbone.init_cfg = None
    if num_classes is not None:
        cfg.model.bbox_head.num_classes = num_classes
    return cfg


@dataclass(frozen=True)
class OfficialCheckpoint:
    url: str
    sha256_prefix: str  # the hex digits before ``.pth`` in the file name


def official_checkpoint(name: str) -> OfficialCheckpoint:
    """The published COCO checkpoint of a shipped config, from mmdet's metafile.yml."""
    import yaml

    metafiles = [mmdet_config_dir() / f.config_folder / "metafile.yml" for f in FAMILIES.values()]
    for metafile in metafiles:
        for model in yaml.safe_load(metafile.read_text())["Models"]:
            if model.get("Name") == name and model.get("Weights"):
                url = model["Weights"]
                match = re.search(r"-([0-9a-f]{8,})\.pth$", url)
                if not match:
                    raise ConfigError(f"the published checkpoint URL of {name} has no hash: {url}")
                return OfficialCheckpoint(url, match.group(1))
    raise ConfigError(f"mmdet publishes no checkpoint for {name!r} (see {', '.join(map(str, metafiles))})")
