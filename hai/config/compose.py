"""Composition: Hydra's ``configs/`` tree plus overrides into the typed :class:`~hai.config.Config`.

The schema (``hai.config.schema``) is the bottom of HAI's imports; this module sits at the top: after Hydra fills
the schema it resolves what is decided at compose time from other packages (an ``init_from`` Hugging Face
checkpoint's architecture, ``parallel.layout=auto`` from the planner), so it is the one config module that may
import ``hai.model.hf`` and ``hai.plan``.
"""

from __future__ import annotations

import re

from hai.config.schema import Config, ConfigError

__all__ = ["compose", "config_dir", "to_yaml"]



def config_dir() -> str:
    """Absolute path of the packaged Hydra config tree (``configs/`` in the source checkout)."""
    import os

    import hai.configs  # noqa: F401

    return os.path.dirname(os.path.abspath(hai.configs.__file__))


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose ``configs/config.yaml`` with Hydra overrides and return the validated, typed :class:`Config`.

    Raises :class:`ConfigError` naming the bad override, key or value.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = list(overrides)
    for ov in overrides:
        if ov.startswith("+") or ov.startswith("~"):
            raise ConfigError(f"override {ov!r} adds or deletes a key, which bypasses HAI's schema: use plain "
                              f"key=value with a key that exists (see `configs/` and hai/config/schema.py)")
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value or group=option (e.g. model=tiny train.steps=50)")
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # Hydra and OmegaConf raise several exception types for bad overrides
        if isinstance(e.__cause__, ConfigError):  # a dataclass __post_init__ rejected a value
            raise ConfigError(str(e.__cause__)) from None
        m = re.search(r"Could not override '([^']+)'", str(e))
        if m:
            raise ConfigError(f"unknown key {m.group(1)!r} in overrides {overrides}: it is not in HAI's config schema "
                              f"(hai/config/schema.py); check the spelling against configs/") from None
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"bad configuration {overrides}: {msg}") from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(obj, Config)
    if obj.model.init_from:  # a Hugging Face checkpoint brings its architecture (hai.model.hf)
        from hai.model.hf import apply_init_from

        obj = apply_init_from(obj)
    if obj.parallel.layout == "auto":  # the planner chooses the stages (hai.plan.layout)
        from hai.parallel.topology import Topology
        from hai.plan.layout import resolve_auto

        Topology.from_config(obj)
        obj = resolve_auto(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
