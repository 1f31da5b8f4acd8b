"""Procedural shapes world: exact-ground-truth T2I and editing data without downloads.

Modules: `world` (scenes, rendering), `prompts` (T2I prompts), `edits` (edit
triples), `dataset` (deterministic splits and the cached loader), `tokenizer`
(shipped word-level tokenizer) and `parser` (image parsing and scoring).
"""
