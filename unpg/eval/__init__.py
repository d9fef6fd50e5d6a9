"""Evaluation: verification metrics and the benchmarks behind ``python -m unpg.evaluate``.

``metrics`` (k-fold accuracy, ROC / TAR@FAR, best-threshold accuracy, 1:N rank-k and
TPIR@FPIR), ``features`` (batched, threaded embedding extraction), ``bins`` (insightface
``.bin`` pair sets; ``evaluate_bins`` for training), ``ijb`` (IJB-B/C 1:1 and 1:N), ``kface``
(K-FACE Q1..Q4) and ``report`` (tables, JSON, ROC plots).
"""
