"""openrelease: reproducible, verifiable, MOF-scored open LLM releases."""

__version__ = "0.1.0"
