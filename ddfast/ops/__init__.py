"""ddfast's fused ops (autograd Functions + backend dispatch), one module per op."""
from ddfast.ops.stat_match import MomentSums, Moments, moment_sums, moments, stat_grad_surrogate

__all__ = ["Moments", "MomentSums", "moments", "moment_sums", "stat_grad_surrogate"]
from ddfast.ops.densify import densify_loss; __all__ += ["densify_loss"]  # noqa: E402,E702  K3
from ddfast.ops.apm_loss import apm_loss; __all__ += ["apm_loss"]  # noqa: E402,E702  K4
from ddfast.ops.attention_match import attention_class_sums, attention_grad_surrogate, attention_match; __all__ += ["attention_match", "attention_class_sums", "attention_grad_surrogate"]  # noqa: E402,E702  K2
from ddfast.ops.ln_lrelu import LayerNormLeakyReLU, ln_lrelu; __all__ += ["ln_lrelu", "LayerNormLeakyReLU"]  # noqa: E402,E702  DiM critic block
