"""Gradient sketches: every document's gradient, compressed once, searched for any later query."""
