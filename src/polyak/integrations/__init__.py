"""Integrations with training frameworks. Each submodule imports its framework; ``import
polyak`` imports none of them (install the extra: ``polyak[lightning]``,
``polyak[transformers]``, ``polyak[mmengine]``)."""
