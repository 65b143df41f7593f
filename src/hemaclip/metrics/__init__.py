"""Metrics: numpy (with scikit-learn and scipy), no torch, no other hemaclip layer.

`classification` (hemaclip's one macro F1 and its label convention, per-class numbers),
`statistics` (bootstrap intervals and paired tests), `summary` (a task with its intervals),
`calibration` (ECE, temperature scaling, selective accuracy), `retrieval` (Hit/Precision/MRR/Recall@k)
and `generative` (FID, KID, k-NN precision/recall).
"""
