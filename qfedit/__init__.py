"""qfedit: closed-form fact editing (QF) of language model weights.

Nothing happens at import: no model loads, no database engines, no logging configuration.
"""

__version__ = "0.1.0"
