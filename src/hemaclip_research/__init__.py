"""Studies: research runs that compute and report, above the tasks they use.

`evaluate` (one checkpoint or encoder on one split, in parts), `compare` (paired bootstrap of two
systems), `faithfulness` (are the describe sentences true), `leukaemia` (class sentences vs a plain
classifier on the ALL set), `robustness` (corruptions against a baseline), `synthesis` (GAN fidelity,
memorisation, utility), `demo`, and the shared `plots` and `report` writers.
"""
