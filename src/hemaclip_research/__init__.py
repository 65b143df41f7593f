"""Studies: research runs that compute and report, above the tasks they use.

A package of its own beside the runtime library `hemaclip` (as open_clip_train sits beside open_clip): it
imports the library; of the library only the CLI's commands import it, inside the command that runs a study,
so `import hemaclip` and `hemaclip.load()` never load research code (tests/test_layers.py).

`evaluate` (one checkpoint or encoder on one split, in parts), `compare` (paired bootstrap of two
systems), `faithfulness` (are the describe sentences true), `leukaemia` (class sentences vs a plain
classifier on the ALL set), `robustness` (corruptions against a baseline), `synthesis` (GAN fidelity,
memorisation, utility), `demo`, and the shared `plots` and `report` writers.
"""
