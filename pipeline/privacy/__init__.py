"""Differentially private cross-attention over a private context (arXiv 2407.14717: Liang, Shi, Song, Zhou,
"Differential Privacy of Cross-Attention with Provable Guarantee", arXiv 2407.14717).

Modules: ``features`` (polynomial kernel features), ``calibration`` (analytic Gaussian, exact δ, Laplace,
parameter checks), ``sampler`` (CSPRNG noise), ``release`` (noisy-feature-sum release and its public
guards), ``dptree`` (DPTree / DPTreeDistance / DPTreeSoftmax), ``accounting`` (composition across heads and
layers), ``audit`` (sensitivity search, privacy-loss audit with a broken control, state hashing) and
``model`` (build the releases of a decoder's private prefix and rewrite its attention layers, torch).
"""
