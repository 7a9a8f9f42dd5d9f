"""Evaluation and analysis: paired lm-eval runs against a live talan-serve endpoint
(``talan-eval``), paired statistics (``stats``), and what TALAN does inside the model
(``talan-analyze``)."""
