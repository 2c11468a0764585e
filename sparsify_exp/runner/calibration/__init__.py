"""The ``calibration`` group: model inputs run once before the first step, so that sparsifiers
which rank by data (Wanda's input-feature norms, embedding rows by lookup count) get the
statistics they declare in ``calibration_needs``.

* :mod:`.sources`: ``calibration=batches`` (a ``_target_`` yielding model inputs) and
  ``calibration=text`` (files or strings tokenized with the data source's tokenizer);
* :mod:`.collect`: running the batches under ``torch.inference_mode()`` with a progress bar,
  and the statistics each name gets in its ``add_data`` config;
* :mod:`.checks`: the up-front checks (exit 2 before any run).
"""

from sparsify_exp.runner.calibration.sources import BatchCalibration, TextCalibration

__all__ = ["BatchCalibration", "TextCalibration"]
