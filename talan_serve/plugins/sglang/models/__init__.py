"""SGLang's external model package for TALAN (``SGLANG_EXTERNAL_MODEL_PACKAGE``): SGLang
scans this package's modules for ``EntryClass``."""
