"""SFT training of LoRA/DoRA adapters with and without TALAN: ``talan-train``."""
