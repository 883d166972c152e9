"""The embedded demo: a synthetic fact corpus (``corpus``) and a tiny GPT-NeoX trained on it (``train``)."""
