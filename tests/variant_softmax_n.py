"""A new attention variant, registered in this one place: softmax_n, n * exp(0) in the denominator
(softmax_n(x)_i = exp(x_i) / (n + sum_j exp(x_j)); n = 1 is softmax1). A config selects it by import path,
`attention.variant: tests.variant_softmax_n:SOFTMAX_N`, and sets n as `attention.params.n` (default 2).
"""

from __future__ import annotations

from model.softmax import softmax_n
from model.variants import Setting, Variant, positive

SOFTMAX_N = Variant("softmax_n", softmax_n, settings=(Setting("n", 2.0, positive),))
