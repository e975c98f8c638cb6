"""DSVTransformerConfig: Megatron's TransformerConfig with the ``dsv_*`` fields of DSVConfig.

``core_transformer_config_from_args(args, config_class=DSVTransformerConfig)`` copies every
``--dsv-*`` flag into it (the field names equal the argparse destinations), so each layer reads
its DSV settings from the config Megatron already hands it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dsv.config import DSVConfig


@dataclass
class DSVTransformerConfig(TransformerConfig, DSVConfig):
    """TransformerConfig + DSVConfig; both validations run."""

    def __post_init__(self):
        TransformerConfig.__post_init__(self)
        DSVConfig.__post_init__(self)

    def dsv_config(self) -> DSVConfig:
        """The DSV part alone."""
        return DSVConfig.from_namespace(self)
