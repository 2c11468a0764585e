"""A multirun as one thing: :mod:`.callback` (the parent run and its jobs), :mod:`.pick`
(the rule that picks a setting), :mod:`.summary` (the ``_summary/`` headline metrics),
:mod:`.views` (saved MLflow UI views), :mod:`.report` (the parent's report,
``python -m sparsify_exp.report``)."""
