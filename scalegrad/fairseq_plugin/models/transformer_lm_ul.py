"""``transformer_lm_ul``: the unlikelihood paper's WikiText-103 language model."""

from fairseq.models import register_model_architecture
from fairseq.models.transformer_lm import transformer_lm_big
from fairseq.utils import safe_getattr


@register_model_architecture("transformer_lm", "transformer_lm_ul")
def transformer_lm_ul(args):
    """``transformer_lm_big`` with 16 layers, 8 heads, dropout 0.1, attention
    dropout 0.0, activation dropout 0.1, the final decoder norm kept and the
    adaptive projections tied (each overridable from the command line)."""
    args.decoder_layers = safe_getattr(args, "decoder_layers", 16)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 8)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.1)
    args.no_decoder_final_norm = safe_getattr(args, "no_decoder_final_norm", False)
    args.tie_adaptive_proj = safe_getattr(args, "tie_adaptive_proj", True)
    transformer_lm_big(args)
