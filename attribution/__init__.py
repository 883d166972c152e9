"""attribution: influence functions for language models at corpus scale."""

__version__ = "0.1.0"
