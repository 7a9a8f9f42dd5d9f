"""TEST-HARNESS STAND-IN: ``sgl_kernel.mamba`` names imported by SGLang's hybrid backends
(GDN / KDA) at import time. None is executed by the TALAN tests; each raises."""

from sgl_kernel import _not_implemented

causal_conv1d_fn_cpu = _not_implemented("mamba.causal_conv1d_fn_cpu")
causal_conv1d_update_cpu = _not_implemented("mamba.causal_conv1d_update_cpu")
chunk_gated_delta_rule_cpu = _not_implemented("mamba.chunk_gated_delta_rule_cpu")
