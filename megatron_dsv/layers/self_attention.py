"""DSVSelfAttention: Megatron's SelfAttention that hands its input to DSV core attention.

Only needed for ``--dsv-predictor-input hidden`` (the paper's predictor projects the layer input,
which Megatron's core-attention call does not carry). With the default ``qk`` input it behaves
exactly like ``SelfAttention``.
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention


class DSVSelfAttention(SelfAttention):
    """SelfAttention that passes ``hidden_states`` to a core attention that asks for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wants_input() and self.checkpoint_core_attention:
            # The recompute runs in the backward, after the input hand-off has ended (and, with
            # several microbatches in flight, after other microbatches' forwards).
            raise NotImplementedError(
                "--dsv-predictor-input hidden cannot be combined with selective recompute of "
                "core_attn; use --dsv-predictor-input qk or full recompute."
            )

    def _wants_input(self) -> bool:
        dsv = getattr(self.core_attention, "dsv", None)
        return getattr(dsv, "dsv_predictor_input", None) == "hidden"

    def forward(self, hidden_states, *args, **kwargs):
        core = self.core_attention
        wants_input = self._wants_input()
        if wants_input:
            if self.config.sequence_parallel:
                raise NotImplementedError(
                    "--dsv-predictor-input hidden with --sequence-parallel is not supported; "
                    "use --dsv-predictor-input qk."
                )
            core.set_layer_input(hidden_states)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            if wants_input:
                core.set_layer_input(None)
