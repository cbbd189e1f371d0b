"""Outlier statistics and W8A8 post-training quantization: what the attention variants are measured by.

stats     per-sequence kurtosis / infinity norm through forward hooks on the protocol's modules
ptq       W8A8 fake quantization of a copy of the model (torch.ao observers), calibration
report    one evaluation (FP ppl + outliers + W8A8 ppl) shared by training and `launcher.evaluate`
periodic  the in-training hook (`eval.outlier_interval`)
plots     per-layer heatmap and TensorBoard logging

The protocol is REFERENCE.md's (Bondarenko et al. 2023, as used by OutEffHop). The model under
evaluation is only read: hooks are removed afterwards and quantization works on a copy.
"""
