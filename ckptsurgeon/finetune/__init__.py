"""The built-in fine-tune runner (``finetune:`` in a rules file): freeze, train, resume.

:class:`ckptsurgeon.job.Job` builds the model, loads its weights and calls
:func:`ckptsurgeon.finetune.runner.run_finetune`.
"""
