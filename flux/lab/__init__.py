"""The quality lab: a small Kontext model trained on procedural edits, and the evaluation of the acceleration levels."""
