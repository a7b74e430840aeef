"""Configs by name (any config mmdet ships: the named families' and every other detector's,
``scoring.families``) or by path, and their published checkpoints."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from scoring.errors import MmdetMlflowError
from scoring.families import NAMED, family_of_config, supported_text

COCO_CONFIG_NAME_SUFFIX = "_coco"


class ConfigError(MmdetMlflowError, ValueError):
    """A config that is not of a model family we can package."""


def mmdet_config_dir() -> Path:
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a config mmdet ships (``.py`` optional): the named
    families' folders first, then every folder of mmdet's configs."""
    path = Path(name_or_path)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    name = path.name.removesuffix(".py")
    folders = [folder for family in NAMED for folder in family.config_folders]
    for folder in folders:
        shipped = mmdet_config_dir() / folder / f"{name}.py"
        if shipped.is_file():
            return shipped
    found = sorted(mmdet_config_dir().glob(f"*/{name}.py"))
    if found:
        return found[0]
    named = "; ".join(f"{f.title}: {', '.join(f.shipped_configs)}" for f in NAMED)
    raise ConfigError(f"no config file {str(name_or_path)!r} and no config of that name ships with "
                      f"mmdet (named families' configs: {named}; or any config of mmdet's "
                      f"configs/ folders by name)")


def config_name(name_or_path: str | Path) -> str:
    return Path(str(name_or_path)).name.removesuffix(".py")


def load_config(name_or_path, num_classes: int | None = None):
    """The mmengine Config, made self-contained for packaging: no pretrained-backbone download
    at model build time, and every class-shaped head sized for ``num_classes`` when given (by
    its family). Refused unless its model is an image detector we can serve."""
    from mmengine.config import Config

    path = resolve_config_path(name_or_path)
    try:
        cfg = Config.fromfile(str(path))
    except Exception as err:  # a text file, a config of another library, a syntax error
        raise ConfigError(f"{name_or_path} is not an mmdet config: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300] if str(err) else ''}") from None
    # mmengine formats a config's text with yapf (a model folder's config.py, the fine-tune's log
    # line and the meta of every checkpoint), which took most of a save's time: the same text
    # unformatted, by mmengine's own format_python_code option, which Config.fromfile does not
    # pass on for a plain config file.
    cfg = Config(cfg.to_dict(), cfg_text=cfg.text, filename=cfg.filename, format_python_code=False)
    model = cfg.get("model")
    family = family_of_config(model) if isinstance(model, dict) else None
    if family is None:
        kind = model.get("type") if isinstance(model, dict) else "no model"
        raise ConfigError(f"{name_or_path} is not a config we can package (its model is {kind!r}); "
                          f"supported: {supported_text()}")
    if isinstance(cfg.model.get("backbone"), dict):
        cfg.model.backbone.init_cfg = None
    if num_classes is not None:
        family.set_num_classes(cfg.model, num_classes)
    return cfg


@dataclass(frozen=True)
class OfficialCheckpoint:
    url: str
    sha256_prefix: str  # the hex digits before ``.pth`` in the file name


def official_checkpoint(name: str) -> OfficialCheckpoint:
    """The published COCO checkpoint of a shipped config, from the metafile.yml beside it (found
    by the config file it names: some entries keep an older model name, YOLOF's)."""
    import yaml

    config = resolve_config_path(name)
    metafile = config.parent / "metafile.yml"
    models = yaml.safe_load(metafile.read_text())["Models"] if metafile.is_file() else []
    for model in models:
        if (Path(str(model.get("Config", ""))).name == config.name or model.get("Name") == name) \
                and model.get("Weights"):
            url = model["Weights"]
            match = re.search(r"-([0-9a-f]{8,})\.pth$", url)
            if not match:
                raise ConfigError(f"the published checkpoint URL of {name} has no hash: {url}")
            return OfficialCheckpoint(url, match.group(1))
    raise ConfigError(f"mmdet publishes no checkpoint for {name!r} (see {metafile})")
