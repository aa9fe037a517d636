"""apexdistill: APEX one-step distillation on Ray."""
__version__ = "0.1.0"


def _resolve(cfg, source="<config>"):
    """The schema's resolver (``config.set_resolver``), imported on first use: ``import apexdistill.config`` loads
    no model, data or family module."""
    from apexdistill.resolve import resolve_defaults

    return resolve_defaults(cfg, source)


def _register() -> None:
    from apexdistill import config

    config.set_resolver(_resolve)


_register()
